"""Evaluation runner: splits, sharding/gathering, resume, failures, multi-process, averaging, submission.

The model is a deterministic fake implementing ``predict_forward`` (masks from a hash of the prompt, the
mode and the frame index); subprocess runs load it through the hidden ``--model-factory`` option.
Environment knobs read by the fake: FAKE_EVAL_RAISE / FAKE_EVAL_NOSEG (JSON lists of expression texts
that raise / return no_seg), FAKE_EVAL_FAIL_RANK (rank whose model loading fails), FAKE_EVAL_ABORT_AFTER
(abort the process after N calls), FAKE_EVAL_SLEEP (seconds per call).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.evaluation import sharding  # noqa: E402
from projects.sasasa2va.evaluation.splits import SPLITS, resolve_split  # noqa: E402

THIS_FILE = os.path.abspath(__file__)
FACTORY = f"{THIS_FILE}:make_fake_model"
DIST_TEST = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "dist_test.sh")
SCRIPT = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "ref_vos_eval.py")
PY = sys.executable


# ================================================================================================ fake model
class FakeAbort(BaseException):
    """Simulates a hard interruption (not caught as a per-expression failure)."""


def _h(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:8], "little")


class FakeModel:
    """Deterministic stand-in for SaSaSa2VAChatModel.predict_forward."""

    def __init__(self, raise_texts=(), noseg_texts=(), abort_after=None, sleep=0.0, uint8=False):
        from projects.sasasa2va.hf.models.templates import eval_prompt

        if uint8:  # offers uint8 probabilities (and then insists on being asked for them)
            self.probs_formats = ("float32", "uint8")
        self.raise_prompts = {eval_prompt(t) for t in raise_texts}
        self.noseg_prompts = {eval_prompt(t) for t in noseg_texts}
        self.abort_after = abort_after
        self.sleep = sleep
        self.calls = 0

    def predict_forward(self, video, text, tokenizer, mode, selected_fids=None, return_probs=True, **options):
        out = self._predict(video, text, mode, selected_fids)
        if options:  # the model options a run passes on (ref_vos_eval's inference flags), visible in the answer
            out["prediction"] += " " + ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        if hasattr(self, "probs_formats"):
            if return_probs != "uint8":
                raise RuntimeError(f"asked for return_probs={return_probs!r}, uint8 is offered")
            from projects.sasasa2va.evaluation.averaging import quantize_probs

            out["probabilities"] = [quantize_probs(out["probabilities"][0])]
        return out

    def _predict(self, video, text, mode, selected_fids):
        self.calls += 1
        if self.abort_after is not None and self.calls > self.abort_after:
            raise FakeAbort(f"abort after {self.abort_after} calls")
        if self.sleep:
            time.sleep(self.sleep)
        if mode == "q_frame":
            assert isinstance(selected_fids, list) and len(selected_fids) == 100, selected_fids
        else:
            assert selected_fids is None
        w, h = video[0].size
        t_n = len(video)
        if text in self.raise_prompts:
            raise RuntimeError(f"fake failure for {text!r}")
        if text in self.noseg_prompts:
            z = np.zeros((t_n, h, w), dtype=np.float32)
            return {"prediction": "Sorry, nothing here.<|end|>", "prediction_masks": [z > 0.5],
                    "probabilities": [z], "num_seg": 0, "status": "no_seg"}
        base = _h(text, mode)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        probs = np.empty((t_n, h, w), dtype=np.float32)
        for t in range(t_n):
            cx, cy = (base + 5 * t) % w, (base // w + 3 * t) % h
            r = 5 + base % 9
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            probs[t] = 1.0 / (1.0 + np.exp((d - r) / 2.0))
        answer = ", ".join(f"Clip_{i + 1} [SEG]" for i in range(10)) + ".<|end|>"
        return {"prediction": answer, "prediction_masks": [probs > 0.5], "probabilities": [probs],
                "num_seg": 10, "status": "ok"}


class ReferenceSignatureModel(FakeModel):
    """predict_forward with the official exports' signature: no return_probs, no option keywords, and
    only the text and the masks in its result."""

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        mode="uniform", print_answer=False, samurai=False, selected_fids=None):
        out = self._predict(video, text, mode, selected_fids)
        return {"prediction": out["prediction"], "prediction_masks": out["prediction_masks"]}


def make_reference_signature_model(hf_dir, device, dtype, remote_code, rank=0):
    model, tok = make_fake_model(hf_dir, device, dtype, remote_code, rank)
    model.__class__ = ReferenceSignatureModel
    return model, tok


def make_fake_model(hf_dir, device, dtype, remote_code, rank=0):
    """Model factory (runner's hidden --model-factory)."""
    fail_rank = os.environ.get("FAKE_EVAL_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) == rank:
        raise RuntimeError(f"fake load failure on rank {rank}")
    abort = os.environ.get("FAKE_EVAL_ABORT_AFTER")
    model = FakeModel(json.loads(os.environ.get("FAKE_EVAL_RAISE", "[]")),
                      json.loads(os.environ.get("FAKE_EVAL_NOSEG", "[]")),
                      abort_after=int(abort) if abort else None,
                      sleep=float(os.environ.get("FAKE_EVAL_SLEEP", "0")),
                      uint8=os.environ.get("FAKE_EVAL_UINT8") == "1")
    return model, object()


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def syn_root(tmp_path_factory):
    """Tiny synthetic MeViS valid_u (3 videos, 3-5 frames of 64x48, 16 expressions) + Q-frame files."""
    from projects.sasasa2va.datasets.synthetic import generate_all

    root = tmp_path_factory.mktemp("evaldata")
    generate_all(str(root / "synthetic"), seed=0, num_train_videos=0, num_valid_u_videos=3, num_valid_videos=0,
                 min_frames=3, max_frames=6, sizes=((64, 48),), formats=("mevis", "qframe"))
    return str(root)


@pytest.fixture(scope="module")
def split(syn_root):
    return resolve_split("SYN_MEVIS_U", data_root=syn_root)


@pytest.fixture(scope="module")
def failing(split):
    """(raise text, no_seg text, expected failed (video, exp) pairs) chosen from the split's expressions."""
    recs = split.load_records()
    texts = [(v, e, x.text) for v, r in recs.items() for e, x in r.expressions.items()]
    raise_text, noseg_text = texts[1][2], texts[6][2]
    assert raise_text != noseg_text
    failed = {(v, e) for v, e, t in texts if t in (raise_text, noseg_text)}
    return raise_text, noseg_text, failed


@pytest.fixture()
def fake_env(monkeypatch, failing):
    monkeypatch.setenv("FAKE_EVAL_RAISE", json.dumps([failing[0]]))
    monkeypatch.setenv("FAKE_EVAL_NOSEG", json.dumps([failing[1]]))
    for k in ("FAKE_EVAL_FAIL_RANK", "FAKE_EVAL_ABORT_AFTER", "FAKE_EVAL_SLEEP", "FAKE_EVAL_UINT8"):
        monkeypatch.delenv(k, raising=False)
    return failing


def _cli(syn_root, work_dir, *extra):
    return ["fakehf", "--dataset", "SYN_MEVIS_U", "--data-root", syn_root, "--work-dir", str(work_dir),
            "--model-factory", FACTORY, "--no-progress", *extra]


def run_inproc(syn_root, work_dir, *extra) -> int:
    from projects.sasasa2va.evaluation import ref_vos_eval

    return ref_vos_eval.main(_cli(syn_root, work_dir, *extra))


def run_inproc_raising(syn_root, work_dir, *extra) -> int:
    """run_inproc, with the error raised (ref_vos_eval.main prints bad-input errors and returns 2)."""
    from projects.sasasa2va.evaluation import ref_vos_eval
    from projects.sasasa2va.evaluation.runner import run_evaluation

    opts = ref_vos_eval.options_from_args(ref_vos_eval.build_parser().parse_args(_cli(syn_root, work_dir, *extra)))
    run_evaluation(opts)
    return 0


def run_dist(syn_root, work_dir, nproc, *extra, env_extra=None, timeout=90):
    env = dict(os.environ)
    env.update(env_extra or {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["PORT"] = str(s.getsockname()[1])
    cmd = ["bash", DIST_TEST, SCRIPT] + _cli(syn_root, work_dir, *extra)[:1] + [str(nproc)] + \
        _cli(syn_root, work_dir, *extra)[1:]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load(path) -> dict:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


# ================================================================================================ sharding
def _items(counts):
    items = []
    for v, n in enumerate(counts):
        for e in range(n):
            items.append(sharding.Item(len(items), f"v{v}", str(e)))
    return items


def test_sharding_expression_793_8():
    n, w = 793, 8
    shards = [sharding.shard_expression(n, w, r) for r in range(w)]
    assert all(len(s) == 100 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(flat) - len(set(flat)) == 7 and set(flat) == set(range(n))
    assert shards[3][:3] == [3, 11, 19]
    assert [s[-1] for s in shards] == [792, 0, 1, 2, 3, 4, 5, 6]  # padding = the first items again
    assert sharding.interleave_gather(shards, n) == list(range(n))
    assert sharding.gather(shards, shards, n) == list(range(n))
    no_pad = [sharding.shard_expression(n, w, r, include_padding=False) for r in range(w)]
    assert sorted(i for s in no_pad for i in s) == list(range(n))


@pytest.mark.parametrize("scheme", sharding.SCHEMES)
def test_sharding_small_cases(scheme):
    for counts in ([], [1], [3], [2, 5, 1], [4, 4, 4, 1, 7], [1] * 9):
        items = _items(counts)
        n = len(items)
        for w in (1, 2, 3, 4, 8):
            shards = [sharding.shard_indices(items, w, r, scheme) for r in range(w)]
            parts = [[("res", i) for i in s] for s in shards]
            assert sharding.gather(parts, shards, n) == [("res", i) for i in range(n)]
            if scheme == "expression":
                assert sharding.interleave_gather(shards, n) == list(range(n))
                assert len({len(s) for s in shards}) <= 1
            else:
                flat = [i for s in shards for i in s]
                assert sorted(flat) == list(range(n))  # no duplicates, no gaps
                for s in shards:
                    assert s == sorted(s)  # dataset order within a rank (video-major)
                owners = {}
                for r, s in enumerate(shards):
                    for i in s:
                        assert owners.setdefault(items[i].video_id, r) == r  # whole videos


def test_video_assignment_greedy_longest_first():
    items = _items([2, 7, 3, 3, 1])
    owner = sharding.video_assignment(items, 2)
    # longest first: v1(7)->0, v2(3)->1, v3(3)->1, v0(2)->1, v4(1)->0 (tie 8/8 -> rank 0)
    assert owner == {"v1": 0, "v2": 1, "v3": 1, "v0": 1, "v4": 0}
    assert sharding.shard_video(items, 2, 0) == [i.index for i in items if i.video_id in ("v1", "v4")]
    with pytest.raises(ValueError):
        sharding.gather([[1]], [[0]], 2)  # a gap


def test_enumerate_items_order(split):
    recs = split.load_records()
    items = sharding.enumerate_items(recs)
    assert [(i.video_id, i.exp_id) for i in items] == [(v, e) for v, r in recs.items() for e in r.expressions]
    assert [i.index for i in items] == list(range(len(items)))


# ================================================================================================ splits
def test_splits_table_and_errors(syn_root, tmp_path):
    assert {"MEVIS", "MEVIS_U", "MEVIS_T", "SYN_MEVIS", "SYN_MEVIS_U"} <= set(SPLITS)
    s = resolve_split("SYN_MEVIS_U", data_root=syn_root)
    assert s.mask_file and s.mask_file.endswith("mask_dict.json")
    assert s.qframe_file.endswith(os.path.join("synthetic", "mevis_q_frame", "valid_u", "selected_frames.json"))
    with pytest.raises(FileNotFoundError, match="valid"):
        resolve_split("SYN_MEVIS", data_root=syn_root)  # not generated
    with pytest.raises(ValueError, match="unknown split"):
        resolve_split("NOPE", data_root=syn_root)
    # MEVIS_T prefers meta_expressions_release.json; Q-frame file is only needed when loaded
    d = tmp_path / "video_datas" / "mevis" / "test"
    (d / "JPEGImages").mkdir(parents=True)
    (d / "meta_expressions_release.json").write_text('{"videos": {}}')
    (d / "meta_expressions.json").write_text('{"videos": {}}')
    t = resolve_split("MEVIS_T", data_root=str(tmp_path))
    assert os.path.basename(t.meta_file) == "meta_expressions_release.json" and t.mask_file is None
    with pytest.raises(FileNotFoundError, match="selected_frames.json"):
        t.load_qframe({})
    c = resolve_split("custom", split_dir=s.split_dir, qframe_file=s.qframe_file)
    assert len(c.load_qframe(c.load_records())) == 3


# ================================================================================================ runner
def test_runner_results_format_and_failures(syn_root, split, fake_env, tmp_path):
    out = tmp_path / "u"
    assert run_inproc(syn_root, out) == 0
    res = load(out / "results.json")
    keys = list(res)
    assert keys[0] == "__meta__"
    recs = split.load_records()
    assert keys[1:] == list(recs)
    meta = res["__meta__"]
    assert meta["split"] == "SYN_MEVIS_U" and meta["mode"] == "uniform"
    assert meta["num_videos"] == 3 and meta["num_expressions"] == 16 and meta["failed"] == len(fake_env[2])
    from projects.sasasa2va.hf.models.templates import eval_prompt
    from projects.sasasa2va.evaluation.averaging import load_probs
    from projects.sasasa2va.evaluation.results_io import entry_masks

    index = 0
    for vid, rec in recs.items():
        assert list(res[vid]) == list(rec.expressions)
        for eid, exp in rec.expressions.items():
            e = res[vid][eid]
            assert e["index"] == index and e["video_id"] == vid and e["exp_id"] == eid
            assert e["frames"] == rec.frame_names and e["exp"] == eval_prompt(exp.text)
            assert len(e["prediction_masks"]) == rec.num_frames
            index += 1
            if (vid, eid) in fake_env[2]:
                assert e["status"] == "failed" and not entry_masks(e).any()
                assert ("fake failure" in e["error"]) if exp.text == fake_env[0] else ("no [SEG]" in e["error"])
                if exp.text == fake_env[1]:
                    assert e["text_prediction"].startswith("Sorry")
            else:
                assert e["status"] == "ok" and e["error"] is None and "[SEG]" in e["text_prediction"]
                m = entry_masks(e)
                assert m.any() and m.shape == (rec.num_frames, 48, 64)
                q = load_probs(str(out), vid, eid)  # uint8 round(255 p); p = 0.5 exactly quantises to 128
                assert m[q >= 129].all() and not m[q <= 126].any()
    assert os.path.isfile(out / "preds" / keys[1] / "0.json")
    summary = load(out / "eval_summary.json")
    assert summary["this_run"]["processed"] == 16 and summary["this_run"]["failed"] == len(fake_env[2])


def test_resume_byte_identical(syn_root, fake_env, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_inproc(syn_root, full) == 0
    # interrupted run: hard abort after 5 expressions
    monkeypatch.setenv("FAKE_EVAL_ABORT_AFTER", "5")
    with pytest.raises(BaseException, match="abort after 5 calls"):  # FakeAbort of the factory module
        run_inproc(syn_root, part)
    monkeypatch.delenv("FAKE_EVAL_ABORT_AFTER")
    assert not os.path.exists(part / "results.json")
    assert 0 < sum(len(fs) for _, _, fs in os.walk(part / "preds")) < 16
    assert run_inproc(syn_root, part) == 0
    assert read_bytes(part / "results.json") == read_bytes(full / "results.json")
    assert load(part / "eval_summary.json")["this_run"]["skipped"] == 5
    # delete results.json, some preds and a probs file, leave a stale temp file: rerun -> identical
    os.unlink(part / "results.json")
    vids = sorted(os.listdir(part / "preds"))
    shutil.rmtree(part / "preds" / vids[0])
    os.unlink(part / "preds" / vids[2] / "1.json")
    os.unlink(part / "probs" / vids[1] / "3.npz")  # an ok entry without its probs is recomputed
    (part / "preds" / vids[2] / ".tmp_garbage1.json").write_text('{"trunc')
    assert run_inproc(syn_root, part) == 0
    assert read_bytes(part / "results.json") == read_bytes(full / "results.json")
    # another model/setting in the same work dir is refused
    from projects.sasasa2va.evaluation.runner import model_fingerprint

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"one")
    first = model_fingerprint(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"second")  # retrained / re-exported into the same folder
    assert first and model_fingerprint(str(model_dir)) != first and model_fingerprint(str(tmp_path / "no")) is None
    with pytest.raises(ValueError, match="different run"):
        run_inproc_raising(syn_root, part, "--blind-expression", "the object")
    assert run_inproc(syn_root, part, "--blind-expression", "the object", "--overwrite") == 0
    assert load(part / "results.json")["__meta__"]["blind_expression"] == "the object"


def test_average_ahead_resume_recomputes_from_files(syn_root, fake_env, tmp_path, monkeypatch):
    """A resumed run averages from the stored probabilities (earlier runs' averaged entries are not used,
    even for expressions it does not recompute), with results.json identical to one uninterrupted run."""
    from projects.sasasa2va.evaluation import average_ahead

    args = ("--mode", "uniform,q_frame", "--average")
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_inproc(syn_root, full, *args) == 0
    monkeypatch.setenv("FAKE_EVAL_ABORT_AFTER", "7")
    with pytest.raises(BaseException, match="abort after 7 calls"):
        run_inproc(syn_root, part, *args)
    monkeypatch.delenv("FAKE_EVAL_ABORT_AFTER")
    earlier = sorted(os.path.relpath(os.path.join(d, f), part / "average")
                     for d, _, fs in os.walk(part / "average") for f in fs if f.endswith(".json"))
    assert earlier  # the interrupted run averaged some expressions ahead
    for rel in earlier:  # doctored: used by mistake, they would change results.json
        path = part / "average" / rel
        entry = load(path)
        entry["prediction_masks"] = [{"size": m["size"], "counts": "doctored"} for m in entry["prediction_masks"]]
        average_ahead.atomic_write_json(str(path), entry)
    assert run_inproc(syn_root, part, *args) == 0
    assert read_bytes(part / "results.json") == read_bytes(full / "results.json")
    assert load(part / "eval_summary.json")["this_run"]["skipped"] > 0


def test_predict_video_replacement(syn_root, split, fake_env, tmp_path, monkeypatch):
    """A shared per-video path may return all outputs at once (no callback) or raise for the video."""
    from projects.sasasa2va.evaluation import runner

    ref = tmp_path / "ref"
    assert run_inproc(syn_root, ref) == 0
    original = runner.predict_video
    bad_video = list(split.load_records())[1]

    def batched(model, tokenizer, frames, items, mode, options, on_result=None):
        if items[0].video_id == bad_video:
            raise RuntimeError("shared path exploded")
        return original(model, tokenizer, frames, items, mode, options)  # no on_result

    monkeypatch.setattr(runner, "predict_video", batched)
    out = tmp_path / "batched"
    assert run_inproc(syn_root, out) == 0
    got, want = load(out / "results.json"), load(ref / "results.json")
    for vid in want:
        if vid == "__meta__":
            continue
        if vid == bad_video:
            assert all(e["status"] == "failed" and "shared path exploded" in e["error"] for e in got[vid].values())
        else:
            assert got[vid] == want[vid]


def test_resume_after_kill9(syn_root, fake_env, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_inproc(syn_root, full, "--mode", "uniform") == 0
    env = dict(os.environ, FAKE_EVAL_SLEEP="0.15", PYTHONPATH=ROOT)
    proc = subprocess.Popen([PY, SCRIPT] + _cli(syn_root, part), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            n = sum(len([f for f in fs if not f.startswith(".")]) for _, _, fs in os.walk(part / "preds"))
            if n >= 4 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not os.path.exists(part / "results.json")
    assert run_inproc(syn_root, part) == 0
    assert read_bytes(part / "results.json") == read_bytes(full / "results.json")


def test_multiprocess_identical_and_failing_rank(syn_root, fake_env, tmp_path):
    one = tmp_path / "p1"
    assert run_inproc(syn_root, one, "--mode", "uniform,q_frame") == 0
    env = {"FAKE_EVAL_RAISE": json.dumps([fake_env[0]]), "FAKE_EVAL_NOSEG": json.dumps([fake_env[1]])}
    for nproc, scheme in ((2, "video"), (3, "expression")):
        out = tmp_path / f"p{nproc}"
        r = run_dist(syn_root, out, nproc, "--mode", "uniform,q_frame", "--shard-by", scheme, env_extra=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert f"{nproc} process(es)" in r.stdout
        for mode in ("uniform", "q_frame"):
            rel = os.path.join("modes", mode, "results.json")
            assert read_bytes(out / rel) == read_bytes(one / rel), (nproc, mode)
        assert not os.path.isdir(out / ".dist") or not os.listdir(out / ".dist")  # markers cleaned up
    # one rank raising makes the whole job fail with that rank's error, without hanging
    r = run_dist(syn_root, tmp_path / "fail", 2, env_extra={**env, "FAKE_EVAL_FAIL_RANK": "1"}, timeout=60)
    assert r.returncode != 0
    assert "fake load failure on rank 1" in r.stdout + r.stderr


def test_multimode_average_and_submit(syn_root, split, fake_env, tmp_path):
    from projects.sasasa2va.evaluation.averaging import ensemble_masks, load_probs
    from projects.sasasa2va.evaluation.results_io import entry_masks, read_results
    from projects.sasasa2va.evaluation.submission import check_submission

    out = tmp_path / "avg"
    assert run_inproc(syn_root, out, "--mode", "uniform,q_frame,wrap_around", "--average",
                      "--average-members", "uniform,wrap_around", "--submit") == 0
    for m in ("uniform", "q_frame", "wrap_around"):
        res, meta = read_results(str(out / "modes" / m / "results.json"))
        assert meta["mode"] == m and os.path.isdir(out / "modes" / m / "probs")
    avg, meta = read_results(str(out / "results.json"))
    assert meta["mode"] == "average" and meta["modes"] == ["uniform", "wrap_around"]
    uni, _ = read_results(str(out / "modes" / "uniform" / "results.json"))
    differs = False
    for vid, exps in avg.items():
        for eid, e in exps.items():
            dirs = [str(out / "modes" / m) for m in ("uniform", "wrap_around")]
            members = [load_probs(d, vid, eid) for d in dirs
                       if os.path.isfile(os.path.join(d, "probs", vid, f"{eid}.npz"))]
            if (vid, eid) in fake_env[2]:
                assert e["status"] == "failed"
            else:
                np.testing.assert_array_equal(entry_masks(e), ensemble_masks(members))
                differs |= not np.array_equal(entry_masks(e), entry_masks(uni[vid][eid]))
    assert differs  # the average is not just one member
    assert check_submission(str(out / "Annotations"), split.split_dir) == []
    assert not os.path.exists(out / "modes" / "uniform" / "Annotations")
    # single mode --submit: PNGs of that run
    single = tmp_path / "single"
    assert run_inproc(syn_root, single, "--submit", "--mode", "q_frame") == 0
    assert check_submission(str(single / "Annotations"), split.split_dir) == []


def test_work_dir_layouts_do_not_replace_each_other(syn_root, split, fake_env, tmp_path, capsys):
    """A single-mode run in a multi-mode work dir (or the reverse) would replace its results.json: refused
    with a message and exit status 2; --overwrite discards the other layout's files."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    assert run_inproc(syn_root, multi, "--mode", "uniform,wrap_around", "--average") == 0
    averaged = read_bytes(multi / "results.json")
    assert run_inproc(syn_root, multi, "--mode", "uniform") == 2
    assert "holds a run of several modes" in capsys.readouterr().err
    assert read_bytes(multi / "results.json") == averaged
    assert run_inproc(syn_root, single, "--mode", "uniform") == 0
    first = read_bytes(single / "results.json")
    assert run_inproc(syn_root, single, "--mode", "uniform,wrap_around", "--average") == 2
    assert "holds a single-mode run" in capsys.readouterr().err
    assert read_bytes(single / "results.json") == first
    assert run_inproc(syn_root, single, "--mode", "uniform,wrap_around", "--average", "--overwrite") == 0
    assert read_bytes(single / "results.json") == averaged
    assert not any(os.path.exists(single / sub) for sub in ("preds", "probs", "run_config.json"))


def test_corrupt_probs_file_is_recomputed_on_resume(syn_root, split, fake_env, tmp_path):
    out = tmp_path / "run"
    args = ("--mode", "uniform,wrap_around", "--average")
    assert run_inproc(syn_root, out, *args) == 0
    want = read_bytes(out / "results.json")
    vid = sorted(os.listdir(out / "modes" / "uniform" / "probs"))[0]
    victim = sorted((out / "modes" / "uniform" / "probs" / vid).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # cut short
    from projects.sasasa2va.evaluation.averaging import load_probs

    with pytest.raises(ValueError, match=f"{victim.name}: unreadable probabilities"):
        load_probs(str(out / "modes" / "uniform"), vid, victim.stem)
    assert run_inproc(syn_root, out, *args) == 0
    assert read_bytes(out / "results.json") == want
    assert load(out / "eval_summary.json")["this_run"]["processed"] == 1


def test_bad_model_folder_and_work_dir_are_clear_errors(syn_root, tmp_path, capsys):
    from projects.sasasa2va.evaluation import ref_vos_eval

    base = ["--dataset", "SYN_MEVIS_U", "--data-root", syn_root, "--no-progress"]
    train_dir = tmp_path / "train_work_dir"
    train_dir.mkdir()
    (train_dir / "iter_10.pth").write_bytes(b"x")
    out = tmp_path / "out"
    assert ref_vos_eval.main([str(train_dir), "--work-dir", str(out), *base]) == 2
    err = capsys.readouterr().err
    assert "not an exported model folder (no config.json)" in err and "convert_to_hf.py" in err
    assert not out.exists()  # nothing created, nothing claimed: the corrected command runs there
    assert ref_vos_eval.main([str(tmp_path / "nope"), "--work-dir", str(out), *base]) == 2
    assert "HF model folder not found" in capsys.readouterr().err
    (train_dir / "config.json").write_text('{"model_type": "qwen2"}')
    assert ref_vos_eval.main([str(train_dir), "--work-dir", str(out), *base]) == 2
    assert "model_type 'qwen2', expected one of ('sasasa2va_chat', 'sa2va_chat')" in capsys.readouterr().err
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    assert run_inproc(syn_root, afile) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and afile.read_text() == "mine"


def test_runner_asks_models_for_uint8_probabilities(syn_root, split, fake_env, tmp_path, monkeypatch):
    """A model listing "uint8" in probs_formats is asked for uint8 probabilities (quantized where it runs;
    FAKE_EVAL_UINT8: the fake model lists it and fails any other request); the stored probabilities, the
    results and the average equal those of a float32 run."""
    from projects.sasasa2va.evaluation import predictions
    from projects.sasasa2va.evaluation.averaging import load_probs

    args = ("--mode", "uniform,wrap_around", "--average")
    ref = tmp_path / "ref"
    assert run_inproc(syn_root, ref, *args) == 0
    monkeypatch.setenv("FAKE_EVAL_UINT8", "1")
    got = tmp_path / "u8"
    assert run_inproc(syn_root, got, *args) == 0
    for name in ("results.json", "modes/uniform/results.json", "modes/wrap_around/results.json"):
        a, b = load(ref / name), load(got / name)
        assert {k: v for k, v in a.items() if k != "__meta__"} == {k: v for k, v in b.items() if k != "__meta__"}
    stored = 0
    for vid, rec in split.load_records().items():
        for eid in rec.expressions:
            for m in ("uniform", "wrap_around"):
                d_ref, d_got = str(ref / "modes" / m), str(got / "modes" / m)
                if os.path.isfile(os.path.join(d_ref, "probs", vid, f"{eid}.npz")):
                    np.testing.assert_array_equal(load_probs(d_ref, vid, eid), load_probs(d_got, vid, eid))
                    stored += 1
    assert stored > 0
    u8 = FakeModel(uint8=True)
    assert predictions.probs_request(FakeModel(), True) is True and predictions.probs_request(u8, False) is False
    assert predictions.probs_request(u8, True) == "uint8"
    from PIL import Image

    from projects.sasasa2va.evaluation.averaging import quantize_probs

    frames = [Image.new("RGB", (32, 24))] * 2
    raw = u8.predict_forward(frames, "x", None, "uniform", return_probs="uint8")
    out = predictions.normalize_output(raw, 2, (24, 32))
    ref = predictions.normalize_output(FakeModel().predict_forward(frames, "x", None, "uniform"), 2, (24, 32))
    assert ref.probs.dtype == np.float32 and out.probs.dtype == np.uint8
    assert np.array_equal(out.probs, quantize_probs(ref.probs)) and len(np.unique(out.probs)) > 2


def _ensemble_threads(monkeypatch) -> list:
    """The names of the threads that average expressions (every ensemble_masks call), in call order."""
    from projects.sasasa2va.evaluation import average_ahead

    threads = []
    ensemble = average_ahead.ensemble_masks

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return ensemble(*args, **kwargs)

    monkeypatch.setattr(average_ahead, "ensemble_masks", spy)
    return threads


def test_average_runs_in_threads_bounded_by_memory(syn_root, split, fake_env, tmp_path, monkeypatch):
    """average_runs averages expressions in worker threads -- as many as AVERAGE_MEMORY_BYTES allows for
    the largest video -- and writes the same results.json as one thread."""
    from projects.sasasa2va.evaluation import runner, sharding

    records = split.load_records()
    items = sharding.enumerate_items(records)
    largest = max(r.num_frames * 48 * 64 for r in records.values())  # synthetic frames are 64x48
    monkeypatch.setattr(runner, "AVERAGE_WORKERS", 4)
    monkeypatch.setattr(runner, "AVERAGE_MEMORY_BYTES", largest * (3 + 12) * 2)
    assert runner.average_workers(records, items, 3) == 2  # the memory bound, not the 4 threads
    assert runner.average_workers(records, items, 3 + 30) == 1
    assert runner.average_workers(records, items[:1], 3) == 1
    monkeypatch.setattr(runner, "AVERAGE_MEMORY_BYTES", 1 << 40)
    assert runner.average_workers(records, items, 3) == 4
    threads = _ensemble_threads(monkeypatch)
    monkeypatch.setattr(runner, "AVERAGE_AHEAD", False)  # every expression averaged at the end
    args = ("--mode", "uniform,q_frame,wrap_around", "--average")
    assert run_inproc(syn_root, tmp_path / "threads", *args) == 0
    assert threads and all(t.startswith("average") for t in threads)
    monkeypatch.setattr(runner, "AVERAGE_WORKERS", 1)
    assert run_inproc(syn_root, tmp_path / "one", *args) == 0
    assert read_bytes(tmp_path / "threads" / "results.json") == read_bytes(tmp_path / "one" / "results.json")


def test_average_ahead_gives_the_same_results_and_is_used_only_by_its_run(syn_root, split, fake_env, tmp_path,
                                                                           monkeypatch):
    """Each expression is averaged on its rank once all member modes are in (writer threads, not the
    end-of-run averaging), with results.json byte-identical to averaging everything at the end; the
    end takes an averaged entry only when it carries this run's id, members and threshold."""
    from projects.sasasa2va.evaluation import average_ahead, runner, sharding

    threads = _ensemble_threads(monkeypatch)
    args = ("--mode", "uniform,q_frame,wrap_around", "--average")
    ahead = tmp_path / "ahead"
    assert run_inproc(syn_root, ahead, *args) == 0
    records = split.load_records()
    items = sharding.enumerate_items(records)
    ahead_threads = list(threads)
    monkeypatch.setattr(runner, "AVERAGE_AHEAD", False)
    threads.clear()
    assert run_inproc(syn_root, tmp_path / "end", *args) == 0
    n = len(threads)  # the expressions with at least one member's probabilities
    assert 0 < n == len(ahead_threads) and not (tmp_path / "end" / "average").exists()
    assert not any(t.startswith("average") for t in ahead_threads)
    assert read_bytes(ahead / "results.json") == read_bytes(tmp_path / "end" / "results.json")

    # the end-of-run averaging reads this run's entries (a doctored one shows through) and no other run's
    it = items[0]
    path = average_ahead.ahead_path(str(ahead), it.video_id, it.exp_id)
    entry = load(path)
    tag = entry["average_ahead"]
    assert tag["members"] == ["uniform", "q_frame", "wrap_around"] and tag["threshold"] == 0.5
    entry["prediction_masks"] = [{"size": m["size"], "counts": "doctored"} for m in entry["prediction_masks"]]
    runner.atomic_write_json(path, entry)
    names = tag["members"]
    dirs = [runner.run_dir_for(str(ahead), m, names, True) for m in names]
    meta = load(ahead / "results.json")["__meta__"]

    def averaged(run_id, threshold=0.5):
        threads.clear()
        out = str(tmp_path / f"avg_{run_id}_{threshold}.json")
        runner.average_runs(dirs, names, records, items, out, dict(meta), threshold, ahead=(str(ahead), run_id))
        return load(out)[it.video_id][it.exp_id], len(threads)

    got, computed = averaged(tag["run"])
    assert got["prediction_masks"][0]["counts"] == "doctored" and computed == 0  # all taken from there
    for run_id, threshold in (("another-run", 0.5), (tag["run"], 0.6)):
        got, computed = averaged(run_id, threshold)
        assert got["prediction_masks"][0]["counts"] != "doctored" and computed == n, (run_id, threshold)


def test_average_ahead_collects_expected_expressions_within_memory():
    """AverageAhead returns an expression's job with its last member (maps in the members' order), only
    for expected expressions, and drops one whose maps would exceed the memory bound."""
    from projects.sasasa2va.evaluation.average_ahead import AverageAhead

    members = ["uniform", "q_frame"]
    maps = {m: np.full((2, 3, 4), v, dtype=np.uint8) for m, v in zip(members, (40, 250))}
    av = AverageAhead("/nonexistent", members, 0.5, "run", memory_bytes=2 * 3 * 4)
    av.expect([("v", "0"), ("v", "1")])
    frames = ["a", "b"]
    assert av.add("uniform", 0, "v", "9", frames, "x", maps["uniform"], True, (3, 4)) is None  # not expected
    assert av.add("uniform", 0, "v", "0", frames, "x", maps["uniform"], True, (3, 4)) is None
    assert av.held_bytes == 24
    assert av.add("wrap_around", 0, "v", "0", frames, "x", maps["uniform"], True, (3, 4)) is None  # not a member
    assert av.add("uniform", 1, "v", "1", frames, "x", maps["uniform"], True, (3, 4)) is None  # beyond: dropped
    assert av.add("q_frame", 1, "v", "1", frames, "x", maps["q_frame"], True, (3, 4)) is None
    written = []
    import projects.sasasa2va.evaluation.average_ahead as mod

    job = av.add("q_frame", 0, "v", "0", frames, "x", maps["q_frame"], False, (3, 4))
    assert job is not None and av.held_bytes == 0
    real = mod.atomic_write_json
    try:
        mod.atomic_write_json = lambda path, obj: written.append((path, obj))
        job()
    finally:
        mod.atomic_write_json = real
    (path, entry), = written
    assert path.endswith(os.path.join("average", "preds", "v", "0.json")) and entry["status"] == "ok"
    from projects.sasasa2va.evaluation.results_io import entry_masks

    assert entry_masks(entry).all()  # the mean of 40/255 and 250/255 is above 0.5


def test_blind_subset_and_corrupt_frame(syn_root, split, fake_env, tmp_path):
    from projects.sasasa2va.hf.models.templates import eval_prompt

    recs = split.load_records()
    vids = list(recs)
    out = tmp_path / "blind"
    assert run_inproc(syn_root, out, "--blind-expression", "the object", "--videos", f"{vids[2]},{vids[0]}",
                      "--max-videos", "1") == 0
    res = load(out / "results.json")
    assert list(res) == ["__meta__", vids[0]]
    assert res["__meta__"]["subset"] is True and res["__meta__"]["split_num_expressions"] == 16
    assert res["__meta__"]["blind_expression"] == "the object"
    assert {e["exp"] for e in res[vids[0]].values()} == {eval_prompt("the object")}
    # a corrupt frame fails the expressions of its video only
    sdir = tmp_path / "split"
    shutil.copytree(split.split_dir, sdir)
    bad = recs[vids[1]]
    with open(sdir / "JPEGImages" / vids[1] / f"{bad.frame_names[1]}.jpg", "wb") as f:
        f.write(b"not a jpeg")
    out2 = tmp_path / "corrupt"
    assert run_inproc(syn_root, out2, "--split-dir", str(sdir)) == 0
    res = load(out2 / "results.json")
    assert all(e["status"] == "failed" and "frame loading failed" in e["error"] for e in res[vids[1]].values())
    assert all(len(e["prediction_masks"]) == bad.num_frames for e in res[vids[1]].values())
    assert any(e["status"] == "ok" for e in res[vids[0]].values())


def test_next_video_frames_decoded_ahead_in_a_thread(syn_root, fake_env, tmp_path, monkeypatch):
    """Every video after the first is decoded on the frame loader's thread while the model works on the one
    before; the results are those of loading each video when its turn comes."""
    import threading

    from projects.sasasa2va.evaluation import runner

    loaded, original = [], runner.load_video_frames

    def recording(rec):
        loaded.append((rec.video_id, threading.current_thread().name))
        return original(rec)

    monkeypatch.setattr(runner, "load_video_frames", recording)
    assert run_inproc(syn_root, tmp_path / "ahead", "--mode", "uniform") == 0
    res = load(tmp_path / "ahead" / "results.json")
    vids = [v for v in res if v != "__meta__"]
    assert len(vids) >= 3 and sorted(v for v, _ in loaded) == sorted(vids)
    assert loaded[0][1] == "MainThread" and all(name.startswith("eval-frames") for _, name in loaded[1:])
    monkeypatch.setattr(runner, "FRAME_PREFETCH", False)
    loaded.clear()
    assert run_inproc(syn_root, tmp_path / "inline", "--mode", "uniform") == 0
    assert {name for _, name in loaded} == {"MainThread"}
    assert read_bytes(tmp_path / "ahead" / "results.json") == read_bytes(tmp_path / "inline" / "results.json")


def test_inference_flags_reach_the_model_and_the_run_config(syn_root, fake_env, tmp_path):
    out = tmp_path / "fixes"
    assert run_inproc(syn_root, out, "--path-b-average", "probs", "--uncovered-fix") == 0
    res = load(out / "results.json")
    answers = [e["text_prediction"] for v, es in res.items() if v != "__meta__" for e in es.values()
               if e["status"] == "ok"]
    assert answers and all(a.endswith(" path_b_average=probs,uncovered_fix=True") for a in answers)
    assert load(out / "run_config.json")["predict_options"] == {"path_b_average": "probs", "uncovered_fix": True}
    with pytest.raises(ValueError, match="different run.*predict_options"):
        run_inproc_raising(syn_root, out)  # the same work dir without the fixes: not a resume of this run
    default = tmp_path / "default"
    assert run_inproc(syn_root, default) == 0
    assert "predict_options" not in load(default / "run_config.json")  # defaults record nothing


def test_official_predict_forward_signature(syn_root, split, fake_env, tmp_path, capsys):
    """An official export's predict_forward (reference signature) is called without return_probs: its masks
    become 0/1 probabilities for averaging; option keywords it cannot take stop the run before it starts."""
    from projects.sasasa2va.evaluation.averaging import load_probs

    ref_factory = f"{THIS_FILE}:make_reference_signature_model"
    out = tmp_path / "official"
    cli = _cli(syn_root, out, "--mode", "uniform,wrap_around", "--average")
    cli[cli.index(FACTORY)] = ref_factory
    from projects.sasasa2va.evaluation import ref_vos_eval

    assert ref_vos_eval.main(cli) == 0
    res = load(out / "modes" / "uniform" / "results.json")
    ok = [(v, e) for v, es in res.items() if v != "__meta__" for e, x in es.items() if x["status"] == "ok"]
    assert len(ok) == 15  # (the official result has no status: its no-[SEG] answer is an ok empty mask)
    p = load_probs(str(out / "modes" / "uniform"), *ok[0])
    assert set(np.unique(p)) <= {0, 255} and (p == 255).any()
    assert (out / "results.json").is_file()
    bad = _cli(syn_root, tmp_path / "official2", "--uncovered-fix")
    bad[bad.index(FACTORY)] = ref_factory
    assert ref_vos_eval.main(bad) == 2
    assert "takes no ['uncovered_fix']" in capsys.readouterr().err
    good = bad[:-1]  # the same work dir without the option: the refused run claimed nothing
    assert ref_vos_eval.main(good) == 0


def test_token_ids_filled_from_the_tokenizer():
    from types import SimpleNamespace

    from projects.sasasa2va.evaluation.model_loading import fill_token_ids

    class Tok:
        unk_token_id = 0
        table = {"[SEG]": 7, "<IMG_CONTEXT>": 9}

        def convert_tokens_to_ids(self, token):
            return self.table.get(token, 0)

    config = SimpleNamespace(seg_token_id=None, img_context_token_id=5)
    fill_token_ids(config, Tok(), "hf")
    assert (config.seg_token_id, config.img_context_token_id) == (7, 5)  # a given id is kept
    config = SimpleNamespace()
    Tok.table = {"[SEG]": 7}
    with pytest.raises(ValueError, match="hf: config.json has no img_context_token_id and the tokenizer has no"):
        fill_token_ids(config, Tok(), "hf")


def test_cli_options(tmp_path):
    from projects.sasasa2va.evaluation import ref_vos_eval
    from projects.sasasa2va.evaluation.runner import default_work_dir, parse_modes

    p = ref_vos_eval.build_parser()
    a = p.parse_args(["hf", "--work_dir", "x"])
    assert a.work_dir == "x" and a.mode == "uniform" and a.shard_by == "video" and a.launcher == "none"
    assert p.parse_args(["hf", "--work-dir", "y"]).work_dir == "y"
    assert parse_modes("all") == ["uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus"]
    assert parse_modes("q_frame,uniform,q_frame") == ["q_frame", "uniform"]
    with pytest.raises(ValueError):
        parse_modes("bogus")
    assert default_work_dir("MEVIS_U", ["uniform"]) == os.path.join("work_dirs", "eval", "MEVIS_U_uniform")
    assert ref_vos_eval.main(["hf", "--mode", "bogus"]) == 2
    opts = ref_vos_eval.options_from_args(p.parse_args(["hf", "--q-frame-anchor-fix", "--propagation", "none",
                                                        "--max-new-tokens", "9"]))
    assert opts.predict_options == {"q_frame_anchor_fix": True, "propagation": "none", "max_new_tokens": 9}
    assert ref_vos_eval.options_from_args(p.parse_args(["hf"])).predict_options == {}
    ckpt = tmp_path / "sam2.pt"
    ckpt.write_bytes(b"x")
    opts = ref_vos_eval.options_from_args(p.parse_args(["hf", "--propagation", "memory_original_sam2",
                                                        "--sam2-original", str(ckpt)]))
    assert opts.predict_options == {"propagation": "memory_original_sam2", "sam2_original_checkpoint": str(ckpt)}
    assert ref_vos_eval.main(["hf", "--propagation", "memory_original_sam2"]) == 2
    assert ref_vos_eval.main(["hf", "--propagation", "memory_original_sam2", "--sam2-original",
                              str(tmp_path / "missing.pt")]) == 2
    assert ref_vos_eval.main(["hf", "--sam2-original", str(ckpt)]) == 2
    assert os.access(DIST_TEST, os.X_OK)
    for bad in ("0", "two"):
        r = subprocess.run(["bash", DIST_TEST, SCRIPT, "hf", bad], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and f"NUM_GPUS must be a positive integer (processes per node), got '{bad}'" in r.stderr


def test_resume_sweeps_temp_files_of_cut_short_writes(syn_root, fake_env, tmp_path):
    """Temp files that killed atomic writes left under preds/ and probs/ are removed when a run resumes
    there (before any rank writes a prediction); the finished predictions stay."""
    out = tmp_path / "run"
    args = ("--mode", "uniform,wrap_around", "--average")
    assert run_inproc(syn_root, out, *args) == 0
    want = read_bytes(out / "results.json")
    uniform = out / "modes" / "uniform"
    vid = sorted(os.listdir(uniform / "preds"))[0]
    litter = [uniform / "preds" / vid / ".tmp_k1l2m30.json", uniform / "probs" / vid / ".tmp_x9y8z70.npz",
              out / "average" / "preds" / vid / ".tmp_q5r6s70.json"]
    for path in litter:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"cut short")
    keep = uniform / "notes.txt"  # not a temp file of ours
    keep.write_text("mine")
    assert run_inproc(syn_root, out, *args) == 0
    assert not any(p.exists() for p in litter) and keep.read_text() == "mine"
    assert read_bytes(out / "results.json") == want
    assert load(out / "eval_summary.json")["this_run"]["processed"] == 0
