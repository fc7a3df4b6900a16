"""Issue 6: the evaluation runner computes each video once (shared VideoContext for all expressions and
modes) with outputs byte-identical to the naive path, and tools/benchmark_eval.py runs end to end.

The tiny random model answers a fixed '[SEG] x 10' text through bench.ForcedAnswer (a random LM head
emits arbitrary tokens); everything else -- prompts, ViT, prefill, decoding steps, SAM2 -- runs for real
on CPU float32. The multi-process check loads the same forced model through ``--model-factory``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.evaluation import bench, runner  # noqa: E402
from projects.sasasa2va.evaluation.runner import EvalOptions, run_evaluation  # noqa: E402
from projects.sasasa2va.evaluation.splits import resolve_split  # noqa: E402
from projects.sasasa2va.hf.models.frame_sampling import MODES, select_indices  # noqa: E402

THIS_FILE = os.path.abspath(__file__)
SCRIPT = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "ref_vos_eval.py")
DIST_TEST = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "dist_test.sh")
BENCH = os.path.join(ROOT, "tools", "benchmark_eval.py")
ANSWER = "Sure, " + " ".join(["[SEG]"] * 10) + "."  # 10 prompts, short (fast) answer
LAST_LINE = re.compile(r"^speedup \d+\.\d+ work_over_lower_bound \d+\.\d+$")
E = 3


def make_forced_tiny_model(hf_dir, device, dtype, remote_code, rank=0):
    """--model-factory for subprocess runs: the tiny model cached in ``hf_dir``, forced answer."""
    model, tok = bench.build_tiny_model(hf_dir, device=device, dtype=dtype)
    bench.ForcedAnswer(model, tok, ANSWER)
    return model, tok


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("bench_tiny"))
    bench.build_tiny_model(d)  # writes the folder once
    return d


@pytest.fixture(scope="module")
def forced(tiny_dir, one_thread):
    model, tok = bench.build_tiny_model(tiny_dir)
    fa = bench.ForcedAnswer(model, tok, ANSWER)
    yield model, tok, fa
    fa.remove()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """2 synthetic valid_u videos (5-7 frames, 64x48) with exactly E expressions each."""
    root = str(tmp_path_factory.mktemp("bench_data"))
    return bench.make_bench_splits(root, num_videos=2, exps_per_video=[E], seed=0, min_frames=5, max_frames=7,
                                   sizes=((64, 48),))[E]


def evaluate(model, tok, split, work_dir, naive=False, hf_dir="tiny", **kw):
    opts = EvalOptions(hf_dir=hf_dir, dataset=split.name, split_dir=split.split_dir, qframe_file=split.qframe_file,
                       work_dir=str(work_dir), modes=list(MODES), average=True, device="cpu",
                       model_factory=lambda **_: (model, tok), progress=False, naive=naive, **kw)
    return run_evaluation(opts)


def result_bytes(work_dir) -> dict:
    return {rel: open(os.path.join(work_dir, rel), "rb").read() for rel in bench.result_files("", list(MODES), True)}


# ================================================================================================ runner
def test_shared_path_equals_naive_and_encodes_each_frame_once(forced, split, tmp_path, monkeypatch):
    model, tok, fa = forced
    naive = evaluate(model, tok, split, tmp_path / "naive", naive=True)
    batches = []
    many = model.generate_answers  # ForcedAnswer's wrapper

    def spy(input_ids_list, *args, **kwargs):
        batches.append(len(input_ids_list))
        return many(input_ids_list, *args, **kwargs)

    monkeypatch.setattr(model, "generate_answers", spy)
    shared = evaluate(model, tok, split, tmp_path / "shared")
    monkeypatch.undo()
    # one batch per video with every distinct answer: q_frame's, and one per distinct frame selection of
    # the other modes (uniform = uniform_plus, wrap_around = wrap_around_plus, and short videos even
    # sample the same frames in uniform and wrap_around)
    selections = [len({tuple(select_indices(n, m, 100)) for m in MODES if m != "q_frame"}) for n in split.frames]
    assert batches == [E * (1 + k) for k in selections]
    assert naive["this_run"]["path"] == "naive" and shared["this_run"]["path"] == "shared"
    assert naive["this_run"]["failed"] == shared["this_run"]["failed"] == 0
    a, b = result_bytes(tmp_path / "naive"), result_bytes(tmp_path / "shared")
    assert a.keys() == b.keys() and len(a) == 6
    for rel in a:
        assert a[rel] == b[rel], rel
    res = json.loads(b[os.path.join("modes", "uniform", "results.json")])
    firsts = {e["prediction_masks"][0]["counts"] for v, exps in res.items() if v != "__meta__" for e in exps.values()}
    assert len(firsts) > 1  # non-trivial masks: expressions get different ones

    frames = sum(split.frames)
    n_pairs = E * len(MODES)
    ws, wn = shared["this_run"]["work"], naive["this_run"]["work"]
    assert ws["sam2_frames_encoded"] == frames  # every distinct frame once per video
    assert wn["sam2_frames_encoded"] == frames * n_pairs
    assert ws["sam2_features_evicted"] == 0
    records = resolve_split(split.name, split_dir=split.split_dir, qframe_file=split.qframe_file).load_records()
    sp = resolve_split(split.name, split_dir=split.split_dir, qframe_file=split.qframe_file)
    bound = bench.lower_bound_work(model, tok, records, sp.load_qframe(records), list(MODES), fa.num_generated, fa.num_seg)
    for k in ("sam2_frames_encoded", "mllm_images_encoded", "tokens_prefilled", "tokens_decoded"):
        assert ws[k] == bound[k], (k, ws[k], bound[k])
        assert wn[k] > ws[k], k
    assert ws["sam2_decodes"] == bound["sam2_decodes"]  # the pair cache (on by default)
    assert ws["generations_reused"] == sum(E * (len(MODES) - 1 - k) for k in selections)
    assert wn["mllm_images_encoded"] == 20 * 2 * n_pairs  # 2 videos, 20 images per prediction
    assert fa.num_generated == fa.num_tokens - 1  # "... Clip_10 [SEG]." + stop word: stops after the "."
    assert wn["tokens_decoded"] == 2 * n_pairs * (fa.num_generated - 1)


def test_shared_path_resume_failures_and_feature_budget(forced, split, tmp_path, monkeypatch):
    """A failing (expression, mode) is recorded the same way on both paths; a run interrupted in the
    middle of a video resumes (partial mode sets per expression) to byte-identical results, also with
    a feature budget that forces evictions and recomputation."""
    from projects.sasasa2va.hf.models.video_context import VideoContext
    from projects.sasasa2va.hf.models.templates import eval_prompt

    model, tok, _ = forced
    records = resolve_split(split.name, split_dir=split.split_dir, qframe_file=split.qframe_file).load_records()
    first = next(iter(records.values()))
    bad_text = eval_prompt(first.expressions["1"].text)
    original = VideoContext.predict

    def predict(self, text, mode="uniform", *args, **kwargs):
        if text == bad_text and mode == "wrap_around":
            raise RuntimeError("planted failure")
        return original(self, text, mode, *args, **kwargs)

    monkeypatch.setattr(VideoContext, "predict", predict)
    ref = evaluate(model, tok, split, tmp_path / "ref", naive=True)
    assert ref["this_run"]["failed"] == 1

    class Interrupt(BaseException):
        pass

    write = runner._write_output
    count = {"n": 0}

    def interrupted(*args, **kwargs):
        count["n"] += 1
        if count["n"] > 7:  # mid-way through the first video (15 pairs)
            raise Interrupt()
        return write(*args, **kwargs)

    monkeypatch.setattr(runner, "_write_output", interrupted)
    with pytest.raises(Interrupt):
        evaluate(model, tok, split, tmp_path / "part")
    monkeypatch.setattr(runner, "_write_output", write)
    budgets = []
    make_context = model.video_context

    def video_context(tokenizer, frames, feature_budget_bytes=None, **kw):
        budgets.append(feature_budget_bytes)
        return make_context(tokenizer, frames, feature_budget_bytes, **kw)

    monkeypatch.setattr(model, "video_context", video_context)
    resumed = evaluate(model, tok, split, tmp_path / "part", feature_budget_mb=0.5)
    assert budgets == [2**19] * 2  # one context per video, with the budget
    assert resumed["this_run"]["skipped"] == 7 and resumed["this_run"]["failed"] == 1
    assert resumed["this_run"]["processed"] == 2 * E * len(MODES) - 7
    a, b = result_bytes(tmp_path / "ref"), result_bytes(tmp_path / "part")
    for rel in a:
        assert a[rel] == b[rel], rel
    failed = json.loads(b[os.path.join("modes", "wrap_around", "results.json")])[first.video_id]["1"]
    assert failed["status"] == "failed" and "RuntimeError: planted failure" in failed["error"]


def test_models_without_predict_video_use_predict_forward(forced, split, tmp_path):
    """The per-expression fallback (test fakes, other models) gives the same bytes as the shared path."""
    model, tok, _ = forced

    class ForwardOnly:
        def predict_forward(self, **kwargs):
            return model.predict_forward(**kwargs)

    proxy = ForwardOnly()
    assert runner.supports_shared_path(model) and not runner.supports_shared_path(proxy)
    opts = EvalOptions(hf_dir="tiny", dataset=split.name, split_dir=split.split_dir, qframe_file=split.qframe_file,
                       work_dir=str(tmp_path / "fwd"), modes=["uniform", "q_frame"], average=True, device="cpu",
                       model_factory=lambda **_: (proxy, tok), progress=False)
    s = run_evaluation(opts)
    assert s["this_run"]["path"] == "per-expression" and s["this_run"]["work"] == {}
    opts.work_dir, opts.model_factory = str(tmp_path / "sh"), (lambda **_: (model, tok))
    assert run_evaluation(opts)["this_run"]["path"] == "shared"
    for rel in ("results.json", os.path.join("modes", "q_frame", "results.json")):
        assert open(tmp_path / "fwd" / rel, "rb").read() == open(tmp_path / "sh" / rel, "rb").read()


def test_cli_flags(tmp_path):
    from projects.sasasa2va.evaluation import ref_vos_eval

    args = ref_vos_eval.build_parser().parse_args(["hf", "--naive", "--feature-budget-mb", "256"])
    opts = ref_vos_eval.options_from_args(args)
    assert opts.naive is True and opts.feature_budget_mb == 256.0
    opts = ref_vos_eval.options_from_args(ref_vos_eval.build_parser().parse_args(["hf"]))
    assert opts.naive is False and opts.feature_budget_mb is None
    with pytest.raises(ValueError, match="feature-budget-mb"):
        run_evaluation(EvalOptions(hf_dir="hf", work_dir=str(tmp_path), feature_budget_mb=-1))


@pytest.mark.slow
def test_multiprocess_shared_path_identical(forced, split, tiny_dir, tmp_path):
    model, tok, _ = forced
    one = tmp_path / "p1"
    evaluate(model, tok, split, one, hf_dir=tiny_dir)  # same model name in __meta__
    common = ["--dataset", split.name, "--split-dir", split.split_dir, "--qframe-file", split.qframe_file,
              "--mode", "all", "--average", "--no-progress", "--no-remote-code", "--model-factory",
              f"{THIS_FILE}:make_forced_tiny_model"]
    for nproc, scheme in ((2, "video"), (3, "expression")):
        out = tmp_path / f"p{nproc}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["PORT"] = str(s.getsockname()[1])
        cmd = ["bash", DIST_TEST, SCRIPT, tiny_dir, str(nproc), "--work-dir", str(out), "--shard-by", scheme] + common
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "shared path work" in r.stdout
        a, b = result_bytes(one), result_bytes(out)
        for rel in a:
            assert a[rel] == b[rel], (nproc, rel)


# ================================================================================================ benchmark tool
def _tool(name: str):
    """A script of tools/ as a module (imported by its file name, as the scripts import each other)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _bench_work(tiny_dir, work):
    """A benchmark work dir holding a copy of the tiny model folder (no tokenizer training per test)."""
    shutil.copytree(tiny_dir, work / "tiny_model")
    return work


def _bench_args(work_dir, *extra):
    return ["--work-dir", str(work_dir), "--num-videos", "1", "--exps-per-video", "2", "--min-frames", "4",
            "--max-frames", "5", "--frame-size", "64x48", "--device", "cpu", "--threads", "1", "--answer", ANSWER,
            *extra]


def test_benchmark_eval_quick(tiny_dir, one_thread, tmp_path, capsys):
    benchmark_eval = _tool("benchmark_eval")
    work = _bench_work(tiny_dir, tmp_path / "bench")
    out_json = tmp_path / "figures.json"
    assert benchmark_eval.main(_bench_args(work, "--modes", "uniform,q_frame,wrap_around", "--skip-train",
                                           "--no-warmup", "--json", str(out_json))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-1]
    text = "\n".join(lines)
    assert "outputs identical (naive vs shared, 4 results.json): yes" in text
    assert "scaling (shared path): 2 -> 4 expressions/video" in text
    fig = json.loads(out_json.read_text())
    ev = fig["eval"]
    assert ev["identical"]["files_identical"] is True
    assert ev["shared"]["work"]["sam2_frames_encoded"] == ev["lower_bound"]["sam2_frames_encoded"] == sum(
        fig["data"]["frames_per_video"])
    assert ev["naive"]["work"]["sam2_frames_encoded"] == 2 * 3 * ev["shared"]["work"]["sam2_frames_encoded"]
    assert 1.0 <= ev["work_over_lower_bound"] <= 1.5
    assert fig["scaling"]["exps_per_video"] == [2, 4]
    # the 2E lower bound: the same frames, twice the answers (every expression decodes its own answer)
    lb1, lb2 = fig["scaling"]["lower_bound"]
    assert lb1 == ev["lower_bound"]
    assert lb2["sam2_frames_encoded"] == lb1["sam2_frames_encoded"]
    assert lb2["tokens_decoded"] == 2 * lb1["tokens_decoded"]
    assert fig["scaling"]["lower_bound_increase_pct"]["tokens_decoded"] == 100.0
    assert "scaling, lower bound 2 -> 4 expressions/video: sam2_frames +0%" in text
    assert "scaling by phase (s, shared path): " in text
    assert lines[-1] == f"speedup {fig['speedup']:.2f} work_over_lower_bound {ev['work_over_lower_bound']:.2f}"


def test_benchmark_eval_context_options(tiny_dir, one_thread, tmp_path, capsys):
    """--decode-batch-prompts / --decode-batch-kv-mb / --pair-cache-mb / --plain-batched-decoding /
    --decode-attention / --output-cache-mb reach the shared path's contexts: with the pair cache every distinct (frame, [SEG]) decode of an answer happens
    once (the lower bound)."""
    benchmark_eval = _tool("benchmark_eval")
    work = _bench_work(tiny_dir, tmp_path / "bench")
    out_json = tmp_path / "figures.json"
    assert benchmark_eval.main(_bench_args(work, "--modes", "uniform,uniform_plus", "--skip-train", "--no-warmup",
                                           "--skip-scaling", "--decode-batch-prompts", "1", "--pair-cache-mb", "8",
                                           "--decode-batch-kv-mb", "0", "--plain-batched-decoding",
                                           "--decode-attention", "matmul", "--output-cache-mb", "0",
                                           "--json", str(out_json))) == 0
    assert LAST_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
    fig = json.loads(out_json.read_text())
    assert fig["shared_context_options"] == {"decode_batch_prompts": 1, "decode_batch_kv_bytes": 0,
                                             "pair_cache_bytes": 8 << 20, "exact_rows": False,
                                             "decode_attention": "matmul", "output_cache_bytes": 0}
    assert benchmark_eval.shared_context_options(benchmark_eval.build_parser().parse_args(
        ["--decode-batch-kv-mb", "1.5"])) == {"decode_batch_kv_bytes": 3 << 19}
    ev = fig["eval"]
    assert ev["shared"]["work"]["sam2_decodes"] == ev["lower_bound"]["sam2_decodes"]
    assert ev["naive"]["work"]["sam2_decodes"] > ev["shared"]["work"]["sam2_decodes"]


def test_benchmark_eval_no_average_ahead(monkeypatch):
    """--no-average-ahead turns the runner's averaging ahead off (end-of-run averaging only)."""
    from projects.sasasa2va.evaluation import runner

    benchmark_eval = _tool("benchmark_eval")
    monkeypatch.setattr(runner, "AVERAGE_AHEAD", True)
    benchmark_eval.run_settings(benchmark_eval.build_parser().parse_args(["--device", "cpu"]))
    assert runner.AVERAGE_AHEAD is True
    benchmark_eval.run_settings(benchmark_eval.build_parser().parse_args(["--device", "cpu", "--no-average-ahead"]))
    assert runner.AVERAGE_AHEAD is False


def test_benchmark_eval_skip_naive_and_scaling_rounds(tiny_dir, one_thread, tmp_path, capsys):
    """--skip-naive: shared path, work counts and scaling only, its own last line; --scaling-repeat 2: two
    runs of 2E alternating with a second run of E, the fastest of each compared."""
    benchmark_eval = _tool("benchmark_eval")
    work = _bench_work(tiny_dir, tmp_path / "bench")
    out_json = tmp_path / "figures.json"
    assert benchmark_eval.main(_bench_args(work, "--modes", "uniform,q_frame", "--skip-train", "--no-warmup",
                                           "--skip-naive", "--scaling-repeat", "2", "--json", str(out_json))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(out_json.read_text())
    assert not (work / "naive").exists() and fig["eval"]["naive"] is None and "speedup_wall" not in fig["eval"]
    sc = fig["scaling"]
    assert sc["rounds"] == 2 and [len(r) for r in sc["wall_s_runs"]] == [2, 2]
    assert sc["wall_s"] == [min(sc["wall_s_runs"][0]), min(sc["wall_s_runs"][1])]
    assert sc["wall_s_runs"][0][0] == fig["eval"]["shared"]["wall_s"]
    medians = [sum(r) / 2 for r in sc["wall_s_runs"]]  # (two runs each: the median is their mean)
    assert sc["median_increase_pct"] == pytest.approx(100.0 * (medians[1] / medians[0] - 1.0))
    assert sc["phases_s"][0] and sc["proportional_increase_pct"] == benchmark_eval.proportional_growth(sc)
    assert all(set(w) == {"wait", "close"} for w in sc["writer_s"])
    assert lines[-1] == (f"scaling_pct {sc['increase_pct']:.1f} work_over_lower_bound "
                         f"{fig['eval']['work_over_lower_bound']:.2f}")
    text = "\n".join(lines)
    assert "outputs identical" not in text and "scaling runs (s, fastest kept): 2 exps " in text
    assert f"({sc['median_increase_pct']:+.1f}%)" in text
    assert "of which writer (model's thread waiting, s): wait " in text
    with pytest.raises(SystemExit):
        benchmark_eval.main(_bench_args(work, "--scaling-repeat", "0"))


def test_object_like_masks_field_veto_and_removal(tiny_dir):
    """The field makes the centre an object and the corners background whatever the model's small logits;
    a vetoed frame (-1024) stays empty; masks of the field alone are an ellipse; remove() restores."""
    model, _ = bench.build_tiny_model(tiny_dir)
    grounding = model.grounding_encoder
    low = torch.randn(3, 16, 16) * 0.5
    low[2] = -1024.0
    plain = grounding.upsample_logits(low, (48, 64))
    with bench.ObjectLikeMasks(model, strength=12.0) as dev:
        shaped = grounding.upsample_logits(low, (48, 64))
        field = dev.field((48, 64), shaped.device)
        assert torch.equal(shaped, plain + field)
        masks = shaped > 0
        assert masks[:2, 24, 32].all() and not masks[:2, [0, 0, 47, 47], [0, 63, 0, 63]].any()
        assert not masks[2].any()
        assert float(field.max()) == 12.0 and float(field.min()) == -12.0
        inside = field > 0
        assert 0.15 < float(inside.float().mean()) < 0.25  # an ellipse of half the frame's height and width: pi/16
    assert "upsample_logits" not in grounding.__dict__
    assert torch.equal(grounding.upsample_logits(low, (48, 64)), plain)


def test_phase_timing_separate_on_cuda_only():
    """Phases inline on CPU (PhaseTimer only reads a clock there); on CUDA in a run of their own, since
    PhaseTimer synchronises the GPU per phase call -- unless --phases-in-timed-runs."""
    benchmark_eval = _tool("benchmark_eval")
    parse = benchmark_eval.build_parser().parse_args
    assert benchmark_eval.phase_timing(parse([]), "cpu") == "inline"
    assert benchmark_eval.phase_timing(parse([]), "cuda:0") == "separate"
    assert benchmark_eval.phase_timing(parse(["--phases-in-timed-runs"]), "cuda:0") == "inline"


def test_benchmark_eval_separate_phase_runs(tiny_dir, one_thread, tmp_path, capsys, monkeypatch):
    """With separate phase timing (CUDA's default, forced here on CPU) the timed runs carry no PhaseTimer,
    the phases come from one more run per path and per E, and the tables say whose wall time they split."""
    benchmark_eval = _tool("benchmark_eval")
    monkeypatch.setattr(benchmark_eval, "phase_timing", lambda args, device: "separate")
    timers, runs = [], []
    real_enter, real_run = bench.PhaseTimer.__enter__, runner.run_evaluation
    monkeypatch.setattr(bench.PhaseTimer, "__enter__", lambda self: timers.append(self) or real_enter(self))
    monkeypatch.setattr(runner, "run_evaluation", lambda opts: runs.append(len(timers)) or real_run(opts))
    work = _bench_work(tiny_dir, tmp_path / "bench")
    out_json = tmp_path / "figures.json"
    assert benchmark_eval.main(_bench_args(work, "--modes", "uniform,q_frame", "--skip-train", "--no-warmup",
                                           "--skip-naive", "--scaling-repeat", "2", "--object-like-masks",
                                           "--json", str(out_json))) == 0
    text = capsys.readouterr().out
    fig = json.loads(out_json.read_text())
    # --object-like-masks: confident probabilities (a random model's sit near 0.5: none at 0 or 255)
    assert fig["model"]["object_like_masks"] and "object-like masks (BENCHMARK-ONLY" in text
    from projects.sasasa2va.evaluation.averaging import list_probs, load_probs
    run_dir = str(work / "shared" / "modes" / "uniform")
    probs = np.stack([load_probs(run_dir, v, e) for v, e in list_probs(run_dir)])
    assert np.isin(probs, (0, 255)).mean() > 0.8
    # shared (bare + phase run), 2E round 1 (bare + phase run), E again (bare), 2E round 2 (bare)
    assert len(runs) == 6 and len(timers) == 2
    shared, sc = fig["eval"]["shared"], fig["scaling"]
    assert shared["phase_timing"] == "separate" and shared["phases_s"] and shared["phases_wall_s"] > 0
    assert shared["phases_wall_s"] != shared["wall_s"]  # another run's wall time
    assert sc["phase_timing"] == "separate" and all(sc["phases_s"]) and all(w > 0 for w in sc["phases_wall_s"])
    assert sc["wall_s"] == [min(sc["wall_s_runs"][0]), min(sc["wall_s_runs"][1])]
    assert sc["proportional_increase_pct"] == benchmark_eval.proportional_growth(sc)
    assert "from the synchronised phase runs" in text and "of wall" in text


def test_proportional_growth_follows_the_lower_bound_counters():
    benchmark_eval = _tool("benchmark_eval")
    b1 = {"mllm_images_encoded": 10, "tokens_decoded": 100, "sam2_frames_encoded": 20}
    b2 = {"mllm_images_encoded": 15, "tokens_decoded": 200, "sam2_frames_encoded": 20}
    scaling = {"exps_per_video": [5, 10], "wall_s": [5.0, 0.0], "lower_bound": [b1, b2],
               "phases_s": [{"vision": 1.0, "generate": 2.0, "sam2_encode": 0.5, "other": 0.5}, {}]}
    # vision x1.5, generate x2, sam2_encode x1, an unmapped phase x1, rest (1.0 s) x2 (the predictions)
    expected = 1.5 + 4.0 + 0.5 + 0.5 + 2.0
    assert benchmark_eval.proportional_growth(scaling) == pytest.approx(100.0 * (expected / 5.0 - 1.0))
    scaling["phases_s"] = [{}, {}]
    assert benchmark_eval.proportional_growth(scaling) is None


def test_compare_run_dirs_measures_how_far_unequal_masks_are(tmp_path):
    """Unequal masks (GPU bf16: equal up to rounding) get an IoU per entry and a share of differing pixels;
    equal entries count as IoU 1."""
    from projects.sasasa2va.datasets.rle import encode_mask

    h, w = 4, 5
    obj = np.zeros((h, w), bool)
    obj[1:3, 1:4] = True  # 6 pixels
    moved = obj.copy()
    moved[1, 1] = False  # 5 of them, plus one more
    moved[0, 0] = True

    def write(d, second_frame_masks):
        entries = {"v": {"0": {"prediction_masks": [encode_mask(obj), encode_mask(obj)]},
                         "1": {"prediction_masks": [encode_mask(obj)] + second_frame_masks}}}
        (d / "results.json").parent.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps({"__meta__": {}, **entries}))

    write(tmp_path / "a", [encode_mask(obj)])
    write(tmp_path / "b", [encode_mask(moved)])
    same = bench.compare_run_dirs(str(tmp_path / "a"), str(tmp_path / "b"), ["results.json"])
    assert not same["files_identical"] and same["entries"] == 2 and same["entries_equal_masks"] == 1
    assert same["pixels"] == 4 * h * w and same["pixels_differing"] == 2
    iou = (6 + 5) / (6 + 7)  # entry 1 over its two frames: intersections 6 + 5, unions 6 + 7
    assert same["mask_iou_min"] == pytest.approx(iou) and same["mask_iou_mean"] == pytest.approx((1 + iou) / 2)
    assert same["worst_entry"] == "results.json v/1"
    lines = _tool("benchmark_eval").identity_lines(same, 1, exact=False)
    assert lines[0].startswith("outputs identical (naive vs shared, 1 results.json): NO; predicted masks equal in "
                               "1/2 entries; differing: results.json (bitwise identity is only expected")
    assert lines[1] == (f"masks naive vs shared: IoU per entry mean {(1 + iou) / 2:.5f}, min {iou:.5f} "
                        f"(results.json v/1); 2 of 80 pixels differ (2.5000%)")
    write(tmp_path / "c", [encode_mask(obj)])
    same = bench.compare_run_dirs(str(tmp_path / "a"), str(tmp_path / "c"), ["results.json"])
    assert same["files_identical"] and same["mask_iou_min"] == 1.0 and same["pixels_differing"] == 0
    assert _tool("benchmark_eval").identity_lines(same, 1, exact=True) == [
        "outputs identical (naive vs shared, 1 results.json): yes; predicted masks equal in 2/2 entries"]


def test_benchmark_writer_quick(tmp_path, capsys):
    """tools/benchmark_writer.py stores every output through the runner (probabilities + preds entry per
    (video, expression)) under each bound; a one-output bound makes the model thread wait for room."""
    bw = _tool("benchmark_writer")
    work = tmp_path / "w"
    assert bw.main(["--frames", "3", "--size", "64x36", "--videos", "2", "--outputs", "3", "--model-s", "0",
                    "--output-ms", "0", "--threads", "1", "--pending-mb", "0.01,auto", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"writer_bound 0 wall_s [0-9.]+ waited_s [0-9.]+ ; writer_bound \d+ wall_s [0-9.]+ "
                        r"waited_s [0-9.]+", out[-1]), out[-1]
    assert out[1].startswith("bound 0 MB (0 outputs)")
    stored = sorted(os.path.relpath(os.path.join(d, f), work) for d, _, fs in os.walk(work) for f in fs)
    assert stored == sorted(f"{kind}/v{v}/{k}.{ext}" for v in range(2) for k in range(3)
                            for kind, ext in (("preds", "json"), ("probs", "npz")))
    probs = bw.object_like_probs(3, 36, 64)
    assert probs.dtype == np.uint8 and (probs == 255).any() and (probs == 0).any()
    for bad in (["--size", "64"], ["--size", "0x36"], ["--pending-mb", "x"], ["--pending-mb", "inf"],
                ["--model-s", "-1"], ["--pending-mb", "0"]):
        with pytest.raises(SystemExit) as exc:
            bw.main(bad)
        assert exc.value.code == 2, bad


def test_benchmark_decode_attention_quick(one_thread, tmp_path, capsys):
    """tools/benchmark_decode_attention.py: both attentions on ragged decode batches agree, one row per
    batch size, the figures in JSON, and bad shapes are refused."""
    bda = _tool("benchmark_decode_attention")
    out_json = tmp_path / "attn.json"
    assert bda.main(["--device", "cpu", "--batches", "1,3", "--context", "40", "--heads", "4", "--kv-heads", "2",
                     "--head-dim", "8", "--layers", "2", "--iters", "2", "--json", str(out_json)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(out_json.read_text())
    assert [r["batch"] for r in fig["rows"]] == [1, 3]
    for r in fig["rows"]:
        assert r["max_abs_diff"] < 1e-5 and r["sdpa_ms_per_step"] == pytest.approx(2 * r["sdpa_ms"])
        # 2 (K and V) x cached tokens x kv heads x head dim x 4 bytes, rows of 40 +- 1 tokens (+1 new)
        assert r["kv_mb"] == pytest.approx(2 * r["batch"] * 40 * 2 * 8 * 4 / 2**20, rel=0.03)
    last = fig["rows"][-1]
    assert lines[-1] == (f"decode_attention batch 3 sdpa_ms {last['sdpa_ms']:.3f} matmul_ms {last['matmul_ms']:.3f} "
                         f"ratio {last['ratio']:.2f}")
    for bad in (["--heads", "5", "--kv-heads", "2"], ["--batches", "0"], ["--batches", "a"]):
        with pytest.raises(SystemExit):
            bda.main(["--device", "cpu", *bad])


def test_profile_eval_quick(tiny_dir, one_thread, tmp_path, capsys):
    """tools/profile_eval.py: the shared path profiled at E and 2E, the growth table led by work that grows
    with the expressions (more predict calls at 2E), and the torch.profiler operator table."""
    profile_eval = _tool("profile_eval")
    work, out = _bench_work(tiny_dir, tmp_path / "prof"), tmp_path / "out"
    assert profile_eval.main(_bench_args(work, "--modes", "uniform,q_frame", "--out", str(out), "--top", "400",
                                         "--torch-profiler", "--raw")) == 0
    files = sorted(os.listdir(out))
    assert files == ["profile_E2.prof", "profile_E2.txt", "profile_E4.prof", "profile_E4.txt",
                     "profile_growth.txt", "torch_profile_E2.txt"]
    growth = (out / "profile_growth.txt").read_text().splitlines()
    predict = [line for line in growth if "video_context.py" in line and "(predict)" in line]
    assert len(predict) == 1 and "4->8" in predict[0]  # 2 modes x 2 -> 4 expressions
    grows = [float(line.split()[0]) for line in growth[1:]]
    assert grows == sorted(grows, reverse=True) and float(predict[0].split()[0]) > 0
    assert "== by self CPU time" in (out / "torch_profile_E2.txt").read_text()
    assert "time growth, E=2 -> 4" in capsys.readouterr().out


def test_profile_eval_sampler(tiny_dir, one_thread, tmp_path, capsys):
    """--sampler: the model's thread sampled instead of cProfile; its files name the project's functions
    and lines, the growth lists are ordered, and a bad interval is a usage error."""
    profile_eval = _tool("profile_eval")
    work, out = _bench_work(tiny_dir, tmp_path / "samp"), tmp_path / "out"
    assert profile_eval.main(_bench_args(work, "--modes", "uniform,q_frame", "--out", str(out), "--sampler", "1")) == 0
    assert sorted(os.listdir(out)) == ["sample_E2.txt", "sample_E4.txt", "sample_growth.txt"]
    e4 = (out / "sample_E4.txt").read_text()
    assert "samples of the main thread" in e4 and "video_context.py(predict_video)" in e4
    deepest = e4.split("== deepest line of this project on the stack")[1]
    assert "projects/sasasa2va/" in deepest and ".py:" in deepest
    growth = (out / "sample_growth.txt").read_text().split("== deepest line")[0].splitlines()[1:]
    grows = [float(line.split()[0]) for line in growth if line.strip()]
    assert grows and grows == sorted(grows, reverse=True)
    assert "time growth, E=2 -> 4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_eval.main(_bench_args(work, "--out", str(out), "--sampler", "0"))


@pytest.mark.slow
def test_benchmark_eval_end_to_end_with_training(tiny_dir, tmp_path):
    work = _bench_work(tiny_dir, tmp_path / "bench")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, BENCH] + _bench_args(work, "--train-steps", "1", "--train-warmup", "1",
                                                              "--json", str(tmp_path / "f.json")),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]), lines[-3:]
    fig = json.loads((tmp_path / "f.json").read_text())
    assert fig["train"]["steps"] == 1 and fig["train"]["steps_per_s"] > 0 and fig["train"]["peak_mem_mb"] > 0
    assert any(line.startswith("train (") for line in lines)


def test_bench_data_replaces_only_its_own(tmp_path):
    """--work-dir . must not regenerate the repo's data/synthetic: only data the benchmark made is replaced."""
    from projects.sasasa2va.datasets.synthetic import generate_all

    root = tmp_path / "data"
    generate_all(str(root / "synthetic"), seed=0, num_train_videos=1, num_valid_u_videos=1, num_valid_videos=0,
                 min_frames=3, max_frames=4, sizes=((64, 48),), formats=("mevis",))
    before = sorted(os.listdir(root / "synthetic"))
    reused = bench.make_bench_splits(str(root), num_videos=1, exps_per_video=[2], min_frames=3, max_frames=4,
                                     sizes=((64, 48),))  # the same settings: used as it is
    assert reused[2].num_videos == 1 and not (root / "synthetic" / bench.BENCH_DATA_MARKER).exists()
    with pytest.raises(ValueError, match="data this benchmark did not make"):
        bench.make_bench_splits(str(root), num_videos=2, exps_per_video=[2], min_frames=3, max_frames=4,
                                sizes=((64, 48),))
    assert sorted(os.listdir(root / "synthetic")) == before and (root / "synthetic" / "mevis" / "train").is_dir()
    own = tmp_path / "own"
    bench.make_bench_splits(str(own), num_videos=1, exps_per_video=[2], min_frames=3, max_frames=4, sizes=((64, 48),))
    splits = bench.make_bench_splits(str(own), num_videos=2, exps_per_video=[2], min_frames=3, max_frames=4,
                                     sizes=((64, 48),))  # other settings: its own data, replaced
    assert splits[2].num_videos == 2
    # an interrupted generation (marker, no data) and an older benchmark folder (no marker) stay its own
    (own / "synthetic" / "synthetic_info.json").unlink()
    shutil.rmtree(own / "synthetic" / "mevis")
    assert bench.make_bench_splits(str(own), num_videos=1, exps_per_video=[2], min_frames=3, max_frames=4,
                                   sizes=((64, 48),))[2].num_videos == 1
    (own / "synthetic" / bench.BENCH_DATA_MARKER).unlink()
    assert bench.make_bench_splits(str(own), num_videos=2, exps_per_video=[2], min_frames=3, max_frames=4,
                                   sizes=((64, 48),))[2].num_videos == 2


def test_benchmark_writer_threads_and_switch_interval_knobs(monkeypatch):
    """--writer-threads / --switch-interval-ms (GPU A/B knobs) reach the runner and the interpreter; bad values
    are refused."""
    be = _tool("benchmark_eval")
    from projects.sasasa2va.evaluation import runner

    monkeypatch.setattr(runner, "WRITER_THREADS", None)
    monkeypatch.setattr(runner, "WRITER_PENDING_BYTES", None)
    old = sys.getswitchinterval()
    try:
        assert be.effective_writer_threads() >= 1
        be.run_settings(be.build_parser().parse_args(["--device", "cpu", "--writer-threads", "0",
                                                      "--switch-interval-ms", "0.5", "--writer-pending-mb", "64"]))
        assert runner.WRITER_THREADS == 0 and be.effective_writer_threads() == 0
        assert runner.WRITER_PENDING_BYTES == 64 << 20 and be.effective_writer_pending_mb() == 64
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
        for bad in (["--writer-threads", "-1"], ["--switch-interval-ms", "0"], ["--writer-pending-mb", "0"]):
            with pytest.raises(SystemExit):
                be.run_settings(be.build_parser().parse_args(["--device", "cpu", *bad]))
    finally:
        sys.setswitchinterval(old)
