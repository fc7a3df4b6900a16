#!/usr/bin/env python
"""Evaluation benchmark (issue 6): naive vs shared per-video computation, work counts vs the lower bound,
expression scaling, and the tiny-config training benchmark -- one run, one model, one data set.

    python tools/benchmark_eval.py                                  # tiny random model, CPU, ~2-3 min
    python tools/benchmark_eval.py --device cuda --dtype bfloat16 --json OUT.json
    python tools/benchmark_eval.py --preset 4b-shaped --device cuda --num-videos 1 --skip-train
    python tools/benchmark_eval.py --model HF_DIR --split-dir data/.../valid_u --qframe-file .../selected_frames.json

What is timed: the whole 5-mode selective-averaging evaluation (``runner.run_evaluation``: frames loaded,
every (mode, expression) predicted and written, results.json per mode, the average) on a synthetic
MeViS valid_u-like split with ``--exps-per-video`` expressions per video, twice on the same in-memory
model:

* naive  -- ``--naive``: every (expression, mode) from scratch (a fresh cache-less VideoContext per
  pair = ``predict_forward(..., naive=True)``: all frames SAM2-encoded, 20 images through the ViT, the
  whole prompt prefilled, every decode call of the plan; on CPU in the shared path's batch-invariant
  units, so both paths' probabilities are bit for bit equal);
* shared -- the default: one VideoContext per video for all its expressions and modes (the video's
  distinct answers greedy-decoded in batches of up to ``--decode-batch-prompts``, bit-identical to
  one-at-a-time decoding on CPU; single SAM2 decodes cached per answer, ``--pair-cache-mb``; see
  VideoContext).

Printed: wall and model time of each, the ratio, the work counters of both (SAM2 frames encoded, MLLM
images encoded, tokens prefilled, tokens decoded, SAM2 decodes) and the lower bound (each distinct
frame / image / prefix / answer / decode once, from the videos and decode plans), whether both paths
wrote identical results (bitwise on CPU float32), the scaling check (shared path with E and 2E
expressions per video), and the training benchmark (tools/benchmark_train.py in its own process).
The last line is ``speedup <x> work_over_lower_bound <y>`` (x: naive / shared wall time of the whole
evaluation; y: the largest shared / lower-bound ratio over the five counters).

The scaling check also prints what the lower bound's own growth implies: the E -> 2E growth of a path
whose every phase cost grew with its lower-bound counter (no economy of scale from larger batches).
``--scaling-repeat N`` times the 2E run N times, alternating with N-1 more runs of E, and compares the
fastest of each (on a freshly started GPU machine single runs drift by seconds). ``--skip-naive`` leaves
out the naive run (A/B runs of shared-path options; last line ``scaling_pct <s> work_over_lower_bound <y>``).

Time by phase (ViT, prefix prefill, generation, SAM2 encode/decode, upsampling; ``bench.PhaseTimer``): on
CPU measured inside the timed runs (reading a clock changes nothing there). On CUDA PhaseTimer has to
synchronise the GPU around every phase call -- some 250 syncs per 25 predictions -- which keeps the host
from queueing work ahead of the GPU, so the timed runs there go bare and the phases come from one more run
(per path; per E in the scaling check) whose wall time is printed beside them (an H200 showed no difference
beyond the noise; the timed runs are simply what a user's run does). ``--phases-in-timed-runs`` times them
inline on CUDA too (how every figure before 2026-11-27's ninth session was measured).

Random models do not emit [SEG]: by default both paths are made to answer the trained form
'Sure, Clip_1 [SEG], ..., Clip_10 [SEG].' + stop word through a logits bias on the LM head
(``bench.ForcedAnswer``, a BENCHMARK-ONLY device; ``--no-force-answer`` turns it off). ``--preset
4b-shaped`` builds a random model with InternVL2.5-4B / Sa2VA-4B shapes (InternViT-300M 448 px,
Qwen2.5-3B-shaped LLM, SAM2 hiera-L 1024 px) directly on the device, with the tiny tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.utils.cli import (  # noqa: E402
    device_problem,
    exit_user_error,
    output_dir_problem,
    output_file_problem,
    positive_int,
    resolve_device,
    run_reporting_user_errors,
    size_wxh,
)

T0 = time.perf_counter()
COUNTER_LABELS = (("sam2_frames_encoded", "sam2_frames"), ("mllm_images_encoded", "mllm_images"),
                  ("tokens_prefilled", "tok_prefill"), ("tokens_decoded", "tok_decoded"),
                  ("sam2_decodes", "sam2_decodes"))
# the lower-bound counter each timed phase's work follows (proportional_growth)
PHASE_COUNTER = {"vision": "mllm_images_encoded", "prefix_prefill": "tokens_prefilled",
                 "generate": "tokens_decoded", "sam2_encode": "sam2_frames_encoded",
                 "sam2_decode": "sam2_decodes", "upsample": "sam2_decodes"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random tiny model) or an HF folder from convert_to_hf")
    p.add_argument("--preset", default=None, choices=("4b-shaped",),
                   help="random-init model with InternVL2.5-4B shapes (ignores --model; tiny tokenizer)")
    p.add_argument("--preset-llm-layers", type=int, default=None, help=argparse.SUPPRESS)  # quick checks only
    p.add_argument("--remote-code", action="store_true", help="load --model with its folder's code")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--num-videos", type=int, default=2, help="videos of the synthetic split (default: %(default)s)")
    p.add_argument("--exps-per-video", type=int, default=5, help="expressions per video, E (default: %(default)s)")
    p.add_argument("--min-frames", type=int, default=12, help="synthetic video length, min (default: %(default)s)")
    p.add_argument("--max-frames", type=int, default=24, help="synthetic video length, max (default: %(default)s)")
    p.add_argument("--frame-size", type=size_wxh, default=(160, 96), help="synthetic frame WxH (default: 160x96)")
    p.add_argument("--split-dir", default=None,
                   help="use this split's videos instead of synthetic ones (expressions re-worded/trimmed to E)")
    p.add_argument("--qframe-file", default=None, help="selected_frames.json of --split-dir (needs --split-dir)")
    p.add_argument("--modes", default="all", help="modes (comma list or 'all'; default: all five)")
    p.add_argument("--no-average", action="store_true", help="do not run selective averaging")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="generation limit (default: the model's, 2048)")
    p.add_argument("--answer", default=None, help="forced answer text (default: 'Sure, Clip_1 [SEG], ..., Clip_10 [SEG].')")
    p.add_argument("--no-force-answer", action="store_true", help="let the model generate freely")
    p.add_argument("--object-like-masks", action="store_true",
                   help="BENCHMARK-ONLY: add a fixed object-shaped field to the mask logits, so a random model's "
                        "outputs (noise masks, probabilities near 0.5) cost what a trained model's confident object "
                        "masks cost to store (bench.ObjectLikeMasks); every model computation still runs")
    p.add_argument("--feature-budget-mb", type=float, default=None, help="shared path's SAM2 feature budget per video")
    p.add_argument("--decode-batch-prompts", type=int, default=None,
                   help="shared path: most prompts greedy-decoded in one batch (default: VideoContext's, 64; "
                        "1 = one at a time)")
    p.add_argument("--decode-batch-kv-mb", type=float, default=None,
                   help="shared path: bound on a decode batch's KV caches, MB (default: VideoContext's: half "
                        "of what the model's weights leave of the GPU's memory, 4096 on CPU; 0 = no bound)")
    p.add_argument("--pair-cache-mb", type=float, default=None,
                   help="shared path: cache of single (frame, [SEG]) SAM2 decodes reused across the decode plans "
                        "of an answer, MB (default: VideoContext's, 256; 0 = off)")
    p.add_argument("--output-cache-mb", type=float, default=None,
                   help="shared path: cache of full-size outputs handed again to the modes whose outputs coincide "
                        "(and encoded once by the writer), MB (default: VideoContext's, 1024; 0 = off)")
    p.add_argument("--plain-batched-decoding", action="store_true",
                   help="shared path: batched greedy decoding with plain batched kernels (VideoContext "
                        "exact_rows=False; the GPU default) instead of the row-exact ones used on CPU")
    p.add_argument("--decode-attention", choices=("sdpa", "matmul"), default=None,
                   help="shared path: attention of the plain batched decoding steps (VideoContext "
                        "decode_attention; default: matmul = GQA-folded batched matmuls; sdpa = transformers' SDPA)")
    p.add_argument("--no-average-ahead", action="store_true",
                   help="average every expression at the end of the run (runner.AVERAGE_AHEAD off) instead of on "
                        "the writer threads as soon as its modes are in")
    p.add_argument("--writer-threads", type=int, default=None,
                   help="output writer threads (runner.WRITER_THREADS; default: a quarter of the cores, at most 4; "
                        "0 = write on the model's thread)")
    p.add_argument("--writer-pending-mb", type=float, default=None,
                   help="MB of output arrays the model's thread may queue for the writers (runner.WRITER_PENDING_BYTES; "
                        "default: a quarter of the available memory, 512 MB to 16 GB)")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="the interpreter's thread switch interval (sys.setswitchinterval; Python's default 5 ms): "
                        "how long the model's thread may wait for the GIL held by a writer thread")
    p.add_argument("--phases-in-timed-runs", action="store_true",
                   help="time the phases inside the timed runs also on CUDA, where PhaseTimer synchronises the GPU "
                        "around every phase call (the measurement before 2026-11-27's ninth session; default there: "
                        "timed runs bare, phases from one extra run)")
    p.add_argument("--skip-scaling", action="store_true", help="no E -> 2E scaling run")
    p.add_argument("--scaling-repeat", type=int, default=1,
                   help="time the 2E run N times, alternating with N-1 more runs of E, and keep the fastest "
                        "of each (drift and first-use costs of a fresh machine fall out; default: %(default)s)")
    p.add_argument("--skip-naive", action="store_true",
                   help="no naive run (shared path, work counts and scaling only: for A/B runs of shared-path "
                        "options); the last line is then 'scaling_pct <s> work_over_lower_bound <y>'")
    p.add_argument("--skip-train", action="store_true", help="no training benchmark")
    p.add_argument("--train-steps", type=int, default=6, help="timed training steps (default: %(default)s)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="no untimed warm-up evaluation")
    p.add_argument("--repeat", type=int, default=1, help="time each path N times, keep the fastest (default: 1)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds: skip the scaling / training parts that would not fit (0 = no limit)")
    p.add_argument("--work-dir", default="work_dirs/benchmark_eval", help="scratch folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    return p


# ================================================================================================ model
def load_bench_model(args, device: str, dtype):
    import torch

    from projects.sasasa2va.evaluation import bench

    cache = os.path.join(args.work_dir, "tiny_model")
    if args.preset == "4b-shaped":
        from transformers import AutoTokenizer

        from projects.sasasa2va.models import tiny

        if not os.path.isfile(os.path.join(cache, "tiny_manifest.json")):
            tiny.make_tiny_pretrained(cache, arch="qwen2", image_size=112, seed=args.seed, with_sa2va_pth=False)
        tok = AutoTokenizer.from_pretrained(os.path.join(cache, tiny.INTERNVL_DIR))
        model, tok = bench.build_4b_shaped_model(tok, device=device, dtype=dtype, seed=args.seed,
                                                 num_layers=args.preset_llm_layers)
        bench.bias_object_score(model)
        return model, tok, "4b-shaped"
    if args.model == "tiny":
        model, tok = bench.build_tiny_model(cache, device=device, dtype=dtype, seed=args.seed)
        return model, tok, "tiny"
    from projects.sasasa2va.evaluation.distributed import DistContext
    from projects.sasasa2va.evaluation.model_loading import load_model
    from projects.sasasa2va.evaluation.runner import EvalOptions

    opts = EvalOptions(hf_dir=args.model, remote_code=args.remote_code, device=device,
                       dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    model, tok = load_model(opts, DistContext(device=device))
    return model, tok, os.path.basename(os.path.normpath(args.model))


# ================================================================================================ eval runs
def phase_timing(args, device: str) -> str:
    """How the phases are timed: "inline" (inside the timed runs) on CPU, where PhaseTimer only reads the
    clock, or with ``--phases-in-timed-runs``; else (CUDA) "separate": PhaseTimer synchronises the GPU
    around every phase call (~250 syncs per 25 predictions, ~450 per 50), which keeps the host from running
    ahead of the GPU, so the timed runs go uninstrumented -- what a user's evaluation does -- and the phases
    come from one extra run. (On an H200 the two differed by less than the run-to-run noise, 2026-11-27.)"""
    if not device.startswith("cuda") or getattr(args, "phases_in_timed_runs", False):
        return "inline"
    return "separate"


def run_eval(model, tok, name: str, split, work_dir: str, modes, average: bool, naive: bool, args, device: str,
             max_videos=None, repeat=None, timing: str | None = None) -> dict:
    """Time ``repeat`` (default ``--repeat``) evaluations, keep the fastest. ``timing``: "inline" (phases
    timed in the timed runs), "separate" (timed runs bare + one phase run after them), "none" (no phases);
    default :func:`phase_timing`. ``phases_wall_s`` is the wall time of the run the phases come from."""
    from projects.sasasa2va.evaluation.runner import EvalOptions

    predict = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    opts = EvalOptions(hf_dir=name, dataset=split.name, split_dir=split.split_dir, qframe_file=split.qframe_file,
                       work_dir=work_dir, modes=list(modes), average=average, device=device, dtype=args.dtype,
                       model_factory=lambda **kw: (model, tok), overwrite=True, progress=False, naive=naive,
                       feature_budget_mb=None if naive else args.feature_budget_mb, max_videos=max_videos,
                       predict_options=predict)
    cuda = device.startswith("cuda")
    context_kw = {} if naive else shared_context_options(args)
    if context_kw:  # the runner builds each video's context through model.video_context
        make_context = model.video_context

        def video_context(tokenizer, frames, feature_budget_bytes=None, **kw):
            return make_context(tokenizer, frames, feature_budget_bytes, **{**context_kw, **kw})

        model.video_context = video_context
    timing = timing or phase_timing(args, device)
    phase_wall = None
    try:
        best = _timed_runs(model, opts, args.repeat if repeat is None else repeat, device, cuda,
                           instrument=timing == "inline")
        if timing == "separate":
            phase_wall, _, phase_s, _ = _timed_runs(model, opts, 1, device, cuda, instrument=True)
    finally:
        if context_kw:
            model.__dict__.pop("video_context", None)
    wall, summary, inline_phases, peak = best
    if timing == "inline":
        phase_s, phase_wall = inline_phases, wall
    elif timing == "none":
        phase_s = None
    this = summary["this_run"]
    if this["failed"]:
        log(f"warning: {this['failed']} failed prediction(s) in {work_dir} (see eval_summary.json)")
    return {"wall_s": wall, "model_s": this["model_seconds"], "predictions": this["processed"],
            "failed": this["failed"], "work": this.get("work", {}), "path": this.get("path"), "work_dir": work_dir,
            "phases_s": phase_s, "phases_wall_s": phase_wall, "phase_timing": timing, "cuda_peak_mb": peak,
            # in "rest": the model's thread waiting for room in the writer's queue / for its last jobs
            "writer_s": {"wait": this.get("writer_wait_seconds", 0.0), "close": this.get("writer_close_seconds", 0.0)}}


def effective_writer_threads() -> int:
    from projects.sasasa2va.evaluation import runner
    from projects.sasasa2va.evaluation.output_writer import writer_threads

    return runner.WRITER_THREADS if runner.WRITER_THREADS is not None else writer_threads()


def effective_writer_pending_mb() -> float:
    from projects.sasasa2va.evaluation import runner
    from projects.sasasa2va.evaluation.output_writer import writer_pending_bytes

    return (runner.WRITER_PENDING_BYTES if runner.WRITER_PENDING_BYTES is not None else writer_pending_bytes()) / 2**20


def shared_context_options(args) -> dict:
    """VideoContext keywords of the shared path given on the command line."""
    kw = {}
    if args.decode_batch_prompts is not None:
        kw["decode_batch_prompts"] = int(args.decode_batch_prompts)
    if args.decode_batch_kv_mb is not None:
        kw["decode_batch_kv_bytes"] = int(args.decode_batch_kv_mb * 2**20)
    if args.pair_cache_mb is not None:
        kw["pair_cache_bytes"] = int(args.pair_cache_mb * 2**20)
    if args.output_cache_mb is not None:
        kw["output_cache_bytes"] = int(args.output_cache_mb * 2**20)
    if args.plain_batched_decoding:
        kw["exact_rows"] = False
    if args.decode_attention is not None:
        kw["decode_attention"] = args.decode_attention
    return kw


def _timed_runs(model, opts, repeat: int, device: str, cuda: bool, instrument: bool = True):
    """(wall, summary, phase seconds or None, CUDA peak MB) of the fastest of ``repeat`` runs; the phases
    timed (PhaseTimer) only with ``instrument``."""
    import torch

    from projects.sasasa2va.evaluation.bench import PhaseTimer
    from projects.sasasa2va.evaluation.runner import run_evaluation

    best = None
    for _ in range(max(1, repeat)):
        sink = io.StringIO()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sink), (PhaseTimer(model) if instrument else contextlib.nullcontext()) as phases:
            summary = run_evaluation(opts)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        if best is None or wall < best[0]:
            best = (wall, summary, dict(phases.seconds) if instrument else None, peak)
    return best


def _fmt(v, width=12, digits=2) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{digits}f}"
    return f"{v:>{width}}"


def table(naive: dict, shared: dict, bound: dict) -> list[str]:
    head = f"{'':14}{'wall_s':>9}{'model_s':>9}" + "".join(f"{lab:>13}" for _, lab in COUNTER_LABELS)
    rows = [head]

    def row(label, wall, model, vals, digits=0):
        cells = "".join(_fmt(v if not isinstance(v, float) or digits else int(round(v)), 13, 2) for v in vals)
        return f"{label:14}{_fmt(wall, 9)}{_fmt(model, 9)}{cells}"

    if naive is not None:
        rows.append(row("naive", naive["wall_s"], naive["model_s"],
                        [naive["work"].get(k, 0) for k, _ in COUNTER_LABELS]))
    rows.append(row("shared", shared["wall_s"], shared["model_s"], [shared["work"].get(k, 0) for k, _ in COUNTER_LABELS]))
    rows.append(row("lower bound", None, None, [bound[k] for k, _ in COUNTER_LABELS]))

    def ratio(a, b):
        return (a / b) if b else None

    if naive is not None:
        rows.append(row("naive/shared", ratio(naive["wall_s"], shared["wall_s"]),
                        ratio(naive["model_s"], shared["model_s"]),
                        [ratio(naive["work"].get(k, 0), shared["work"].get(k, 0)) for k, _ in COUNTER_LABELS], 2))
    rows.append(row("shared/bound", None, None, [ratio(shared["work"].get(k, 0), bound[k]) for k, _ in COUNTER_LABELS], 2))
    return rows


def phase_table(naive: dict, shared: dict) -> list[str]:
    """Where the wall time goes, per path (seconds; 'rest' = frame loading and resizing, KFC image
    building, RLE/probability files, results.json, averaging)."""
    runs = [("naive", naive), ("shared", shared)] if naive is not None else [("shared", shared)]
    names = list(dict.fromkeys(runs[0][1]["phases_s"]))
    separate = any(r.get("phase_timing") == "separate" for _, r in runs)
    rows = ["time by phase  " + "".join(f"{n:>15}" for n in names + ["rest"])
            + (f"{'of wall':>10}" if separate else "")]
    for label, r in runs:
        vals = [r["phases_s"][n] for n in names]
        wall = r.get("phases_wall_s") or r["wall_s"]
        vals.append(wall - sum(vals))
        rows.append(f"{label:15}" + "".join(f"{v:>15.2f}" for v in vals) + (f"{wall:>10.2f}" if separate else ""))
    if separate:
        rows.append("(phases from one more run with every phase call synchronised on the GPU, its wall time in the "
                    "last column; the timed runs above are not synchronised: --phases-in-timed-runs times them inline)")
    if any("writer_s" in r for _, r in runs):
        rows.append("of rest, the model's thread waiting for the output writer (queue full / last jobs): " + ", ".join(
            f"{label} {r.get('writer_s', {}).get('wait', 0.0):.2f} / {r.get('writer_s', {}).get('close', 0.0):.2f} s"
            for label, r in runs))
    return rows


def growth_pct(a: float, b: float):
    """Percent increase from a to b (None when a is 0)."""
    return 100.0 * (b / a - 1.0) if a else None


def split_lower_bound(model, tok, split, modes, forced, run: dict) -> dict:
    """The lower bound of a benchmark split; with free answers (length and [SEG] count unknown) the
    decode counters are ``run``'s own."""
    from projects.sasasa2va.evaluation import bench
    from projects.sasasa2va.evaluation.splits import resolve_split

    resolved = resolve_split(split.name, split_dir=split.split_dir, qframe_file=split.qframe_file)
    records = resolved.load_records()
    qframe = resolved.load_qframe(records) if "q_frame" in modes else None
    bound = bench.lower_bound_work(model, tok, records, qframe, modes, forced.num_generated if forced else 1,
                                   forced.num_seg if forced else None)
    if not forced:
        for k in ("tokens_decoded", "sam2_decodes"):
            bound[k] = run["work"].get(k, 0)
    return bound


def identity_lines(same: dict, num_files: int, exact: bool) -> list[str]:
    """Report of ``bench.compare_run_dirs`` (naive vs shared outputs); ``exact``: CPU float32, where the
    two must be equal bit for bit."""
    eq = "yes" if same["files_identical"] else "NO"
    lines = [f"outputs identical (naive vs shared, {num_files} results.json): {eq}; predicted masks equal in "
             f"{same['entries_equal_masks']}/{same['entries']} entries"
             + ("" if same["files_identical"] else f"; differing: {', '.join(same['differing_files'])}"
                + ("" if exact else " (bitwise identity is only expected on CPU float32: the naive path batches "
                   "the ViT, the prefill and SAM2 encoding differently)"))]
    if not same["files_identical"] and same.get("mask_iou_mean") is not None:
        share = same["pixels_differing"] / same["pixels"] if same["pixels"] else 0.0
        lines.append(f"masks naive vs shared: IoU per entry mean {same['mask_iou_mean']:.5f}, min "
                     f"{same['mask_iou_min']:.5f} ({same['worst_entry']}); {same['pixels_differing']} of "
                     f"{same['pixels']} pixels differ ({100 * share:.4f}%)")
    return lines


def scaling_lines(scaling: dict) -> list[str]:
    """How much of the E -> 2E growth is work the lower bound itself adds (per-expression work: q_frame's
    own frame selections, every answer's decode and SAM2 decodes), and which phases grew."""
    e1, e2 = scaling["exps_per_video"]
    inc = scaling["lower_bound_increase_pct"]
    out = [f"scaling, lower bound {e1} -> {e2} expressions/video: " + ", ".join(
        f"{lab} +{inc[k]:.0f}%" for k, lab in COUNTER_LABELS if inc.get(k) is not None)]
    p1, p2 = scaling["phases_s"]
    names = list(dict.fromkeys(list(p1) + list(p2)))
    walls = scaling.get("phases_wall_s") or scaling["wall_s"]
    rest = [w - sum(p.values()) for w, p in zip(walls, (p1, p2))]
    synced = scaling.get("phase_timing") == "separate"
    out.append("scaling by phase (s, shared path" + (", from the synchronised phase runs" if synced else "") + "): "
               + ", ".join(f"{n} {p1.get(n, 0.0):.2f} -> {p2.get(n, 0.0):.2f}" for n in names)
               + f", rest {rest[0]:.2f} -> {rest[1]:.2f}"
               + (f" (their wall {walls[0]:.2f} -> {walls[1]:.2f} s, {growth_pct(*walls):+.1f}%)" if synced else ""))
    w1, w2 = scaling.get("writer_s") or ({}, {})
    if w1 or w2:
        out.append("of which writer (model's thread waiting, s): " + ", ".join(
            f"{k} {w1.get(k, 0.0):.2f} -> {w2.get(k, 0.0):.2f}" for k in ("wait", "close")))
    prop = scaling.get("proportional_increase_pct")
    if prop is not None:
        out.append(f"scaling if every phase grew with its lower-bound counter (no economy of scale; rest with the "
                   f"predictions): +{prop:.1f}%")
    if scaling.get("rounds", 1) > 1:
        e_runs, d_runs = scaling["wall_s_runs"]
        med = scaling.get("median_increase_pct")
        out.append(f"scaling runs (s, fastest kept): {e1} exps " + ", ".join(f"{w:.2f}" for w in e_runs)
                   + f"; {e2} exps " + ", ".join(f"{w:.2f}" for w in d_runs)
                   + (f"; medians {statistics.median(e_runs):.2f} -> {statistics.median(d_runs):.2f} s "
                      f"({med:+.1f}%)" if med is not None else ""))
    return out


def proportional_growth(scaling: dict):
    """E -> 2E growth (%) of a path whose every phase cost grew in proportion to its lower-bound counter
    (PHASE_COUNTER; the time outside the phases with the number of predictions): what the lower bound's
    own growth implies when batching brings no economy of scale (as on a CPU). None without phases."""
    p1 = scaling["phases_s"][0]
    if not p1:
        return None
    b1, b2 = scaling["lower_bound"]
    total = (scaling.get("phases_wall_s") or scaling["wall_s"])[0]
    grown = 0.0
    for phase, seconds in p1.items():
        counter = PHASE_COUNTER.get(phase)
        factor = b2[counter] / b1[counter] if counter and b1.get(counter) else 1.0
        grown += seconds * factor
    e1, e2 = scaling["exps_per_video"]
    grown += (total - sum(p1.values())) * e2 / e1
    return growth_pct(total, grown)


def measure_scaling(model, tok, name, splits, e1: int, shared: dict, bound: dict, modes, average, forced, args,
                    device: str, rounds: int) -> dict:
    """The shared path with 2E expressions per video against E: ``rounds`` timed runs of 2E alternating
    with ``rounds - 1`` more runs of E (the first E run is ``shared``); the fastest of each is compared."""
    wd = args.work_dir
    sp2 = splits[2 * e1]
    runs = {e1: [shared], 2 * e1: []}
    timing = phase_timing(args, device)
    for r in range(rounds):
        log(f"scaling: shared path with {2 * e1} expressions per video" + (f" (round {r + 1}/{rounds})" if rounds > 1
                                                                          else "") + " ...")
        # separate timing: the phases of 2E from its first round only (those of E come with ``shared``);
        # inline timing: every run has its phases anyway
        runs[2 * e1].append(run_eval(model, tok, name, sp2, os.path.join(wd, "shared_2x"), modes, average, False,
                                     args, device, repeat=1, timing=timing if r == 0 or timing == "inline" else "none"))
        if r < rounds - 1:
            log(f"scaling: shared path with {e1} expressions per video again ...")
            runs[e1].append(run_eval(model, tok, name, splits[e1], os.path.join(wd, "shared"), modes, average,
                                     False, args, device, repeat=1, timing="inline" if timing == "inline" else "none"))
    base = min(runs[e1], key=lambda x: x["wall_s"])
    double = min(runs[2 * e1], key=lambda x: x["wall_s"])
    # the phases of the fastest run when timed inline, else of the one phase run of each E
    phased = [base if base["phases_s"] is not None else runs[e1][0],
              double if double["phases_s"] is not None else runs[2 * e1][0]]
    inc = 100.0 * (double["wall_s"] / base["wall_s"] - 1.0)
    # the fastest of each is the figure; the medians say how much it owes to one lucky run
    medians = [statistics.median(x["wall_s"] for x in runs[e]) for e in (e1, 2 * e1)]
    bound2 = split_lower_bound(model, tok, sp2, modes, forced, double)
    scaling = {"exps_per_video": [e1, 2 * e1], "wall_s": [base["wall_s"], double["wall_s"]],
               "model_s": [base["model_s"], double["model_s"]], "increase_pct": inc,
               "model_increase_pct": 100.0 * (double["model_s"] / base["model_s"] - 1.0) if base["model_s"] else None,
               "rounds": rounds, "wall_s_runs": [[x["wall_s"] for x in runs[e1]], [x["wall_s"] for x in runs[2 * e1]]],
               "median_increase_pct": growth_pct(*medians),
               "work_2x": double["work"], "lower_bound": [bound, bound2],
               "lower_bound_increase_pct": {k: growth_pct(bound[k], bound2[k]) for k, _ in COUNTER_LABELS},
               "phases_s": [p["phases_s"] for p in phased], "phases_wall_s": [p["phases_wall_s"] for p in phased],
               "phase_timing": timing,
               "writer_s": [base.get("writer_s", {}), double.get("writer_s", {})]}
    scaling["proportional_increase_pct"] = proportional_growth(scaling)
    log(f"scaling: {base['wall_s']:.2f} s -> {double['wall_s']:.2f} s (+{inc:.1f}%)")
    return scaling


def run_settings(args):
    """(device, dtype, modes, average) of a parsed command line (torch threads set; bad values exit with
    status 2 before any model or data is built)."""
    import torch

    from projects.sasasa2va.evaluation.model_loading import resolve_dtype
    from projects.sasasa2va.evaluation.runner import parse_modes

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "no_average_ahead", False):
        from projects.sasasa2va.evaluation import runner

        runner.AVERAGE_AHEAD = False
    if getattr(args, "writer_threads", None) is not None:
        if args.writer_threads < 0:
            exit_user_error("--writer-threads must be >= 0")
        from projects.sasasa2va.evaluation import runner

        runner.WRITER_THREADS = args.writer_threads
    if getattr(args, "writer_pending_mb", None) is not None:
        if not args.writer_pending_mb > 0:
            exit_user_error("--writer-pending-mb must be > 0")
        from projects.sasasa2va.evaluation import runner

        runner.WRITER_PENDING_BYTES = int(args.writer_pending_mb * 2**20)
    if getattr(args, "switch_interval_ms", None) is not None:
        if not args.switch_interval_ms > 0:
            exit_user_error("--switch-interval-ms must be > 0")
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if args.exps_per_video < 1 or args.num_videos < 1:
        exit_user_error("--num-videos and --exps-per-video must be >= 1")
    if getattr(args, "scaling_repeat", 1) < 1 or args.repeat < 1:
        exit_user_error("--repeat and --scaling-repeat must be >= 1")
    if args.decode_batch_prompts is not None and args.decode_batch_prompts < 1:
        exit_user_error("--decode-batch-prompts must be >= 1")
    if args.decode_batch_kv_mb is not None and args.decode_batch_kv_mb < 0:
        exit_user_error("--decode-batch-kv-mb must be >= 0")
    if args.pair_cache_mb is not None and args.pair_cache_mb < 0:
        exit_user_error("--pair-cache-mb must be >= 0")
    if args.output_cache_mb is not None and args.output_cache_mb < 0:
        exit_user_error("--output-cache-mb must be >= 0")
    if getattr(args, "train_steps", 1) < 1 or getattr(args, "train_warmup", 0) < 0:
        exit_user_error("--train-steps must be >= 1 and --train-warmup >= 0")
    if not getattr(args, "time_budget", 0.0) >= 0:  # (not "< 0": NaN too)
        exit_user_error("--time-budget must be >= 0 seconds (0 = no limit)")
    problem = (getattr(args, "json", None) and output_file_problem(args.json, "--json")) or \
        output_dir_problem(args.work_dir, "--work-dir") or device_problem(args.device)
    if problem:
        exit_user_error(problem)
    if getattr(args, "split_dir", None) and not os.path.isfile(os.path.join(args.split_dir, "meta_expressions.json")):
        exit_user_error(f"--split-dir {args.split_dir}: no meta_expressions.json there")
    if getattr(args, "model", "tiny") != "tiny" and not os.path.isdir(args.model):
        exit_user_error(f"--model {args.model}: no such folder (an export of convert_to_hf.py)")
    qframe_file = getattr(args, "qframe_file", None)
    if qframe_file and not getattr(args, "split_dir", None):
        exit_user_error("--qframe-file is the selected_frames.json of --split-dir; give --split-dir too (the "
                        "synthetic split brings its own)")
    if qframe_file and not os.path.isfile(qframe_file):
        exit_user_error(f"--qframe-file {qframe_file}: no such file")
    device = resolve_device(args.device)
    if device == "cuda":
        device = "cuda:0"
    try:
        modes = parse_modes(args.modes)
    except ValueError as exc:
        exit_user_error(f"--modes: {exc}")
    return device, resolve_dtype(args.dtype, device), modes, len(modes) > 1 and not args.no_average


# ================================================================================================ main
def main(argv=None) -> int:
    return run_reporting_user_errors(benchmark, build_parser().parse_args(argv))


def benchmark(args) -> None:
    """The whole benchmark of a parsed command line (run_settings checks its options first)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from projects.sasasa2va.evaluation import bench
    from projects.sasasa2va.utils.io import atomic_write_json

    device, dtype, modes, average = run_settings(args)
    os.makedirs(args.work_dir, exist_ok=True)
    figures: dict = {"args": {k: v for k, v in vars(args).items()}, "device": device,
                     "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
                     "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "modes": modes, "average": average,
                     "shared_context_options": shared_context_options(args),
                     "writer_threads": effective_writer_threads(), "writer_pending_mb": effective_writer_pending_mb(),
                     "switch_interval_s": sys.getswitchinterval()}
    log(f"benchmark_eval: device {figures['device_name']} ({device}), dtype {figures['dtype']}, "
        f"{figures['threads']} thread(s), torch {torch.__version__}, {figures['writer_threads']} writer thread(s) "
        f"(up to {figures['writer_pending_mb']:.0f} MB queued), switch interval {figures['switch_interval_s'] * 1000:g} ms")

    # ---- model
    t = time.perf_counter()
    model, tok, name = load_bench_model(args, device, dtype)
    forced = None if args.no_force_answer else bench.ForcedAnswer(model, tok, args.answer)
    if args.object_like_masks:
        bench.ObjectLikeMasks(model)
    nparams = bench.count_parameters(model)
    figures["model"] = {"name": name, "params": nparams, "build_s": time.perf_counter() - t,
                        "num_image_token": int(model.num_image_token), "image_size": int(model.config.image_size),
                        "sam2_image_size": int(model.grounding_encoder.image_size), "template": model.config.template,
                        "forced_answer": forced.text if forced else None,
                        "object_like_masks": bool(args.object_like_masks),
                        "answer_tokens": forced.num_generated if forced else None}
    log(f"model {name}: {nparams / 1e6:.1f}M params (built in {figures['model']['build_s']:.1f} s), MLLM "
        f"{model.config.image_size} px x {model.num_image_token} tokens/image, SAM2 {model.grounding_encoder.image_size} px"
        + (f"; forced answer ({forced.num_generated} of its {forced.num_tokens} tokens generated): {forced.text!r}"
           if forced else "; free generation")
        + ("; object-like masks (BENCHMARK-ONLY logit field: outputs cost what a trained model's do to store)"
           if args.object_like_masks else ""))

    # ---- data
    e1 = args.exps_per_video
    e_list = [e1] if args.skip_scaling else [e1, 2 * e1]
    data_root = os.path.join(args.work_dir, "data")
    if args.split_dir:
        splits = bench.expand_split(args.split_dir, args.qframe_file, data_root, e_list, args.seed, args.num_videos)
    else:
        splits = bench.make_bench_splits(data_root, args.num_videos, e_list, args.seed, args.min_frames,
                                         args.max_frames, (args.frame_size,))
    sp = splits[e1]
    n_exp = sp.num_videos * e1
    figures["data"] = {"num_videos": sp.num_videos, "frames_per_video": sp.frames, "exps_per_video": e1,
                       "expressions": n_exp, "predictions": n_exp * len(modes),
                       "frame_size": None if args.split_dir else list(args.frame_size),
                       "split_dir": sp.split_dir}
    log(f"data: {sp.num_videos} video(s) with {sp.frames} frames"
        + ("" if args.split_dir else f" of {args.frame_size[0]}x{args.frame_size[1]}")
        + f", {e1} expressions per video -> {n_exp} expressions x {len(modes)} mode(s) = {n_exp * len(modes)} "
        f"predictions" + (" + selective averaging" if average else ""))

    # ---- warm-up (lazy init, CUDA's lazily loaded kernels of every mode's shapes, file cache), not timed:
    # with one mode only, the first timed run on a GPU still ran ~1 s slower than the next (2026-11-27)
    wd = args.work_dir
    if not args.no_warmup:
        log("warm-up (1 video, shared path, every mode) ...")
        run_eval(model, tok, name, sp, os.path.join(wd, "warmup"), modes, average, False, args, device, max_videos=1,
                 timing="none")

    # ---- naive vs shared
    naive = None
    if not args.skip_naive:
        log("naive path (every expression x mode from scratch) ...")
        naive = run_eval(model, tok, name, sp, os.path.join(wd, "naive"), modes, average, True, args, device)
        log(f"naive: {naive['wall_s']:.2f} s wall, {naive['model_s']:.2f} s in the model")
    log("shared path (one VideoContext per video) ...")
    shared = run_eval(model, tok, name, sp, os.path.join(wd, "shared"), modes, average, False, args, device)
    log(f"shared: {shared['wall_s']:.2f} s wall, {shared['model_s']:.2f} s in the model")
    bound = split_lower_bound(model, tok, sp, modes, forced, shared)
    ratios = bench.work_ratios(shared["work"], bound)
    worst = max(v for v in ratios.values() if v is not None)
    files = bench.result_files("", modes, average)
    figures["eval"] = {"naive": naive, "shared": shared, "lower_bound": bound, "shared_over_lower_bound": ratios,
                       "work_over_lower_bound": worst}
    speedup = same = None
    if naive is not None:
        same = bench.compare_run_dirs(naive["work_dir"], shared["work_dir"], files)
        speedup = naive["wall_s"] / shared["wall_s"]
        figures["eval"].update({
            "speedup_wall": speedup,
            "speedup_model": naive["model_s"] / shared["model_s"] if shared["model_s"] else None,
            "naive_over_shared_work": {k: (naive["work"].get(k, 0) / shared["work"][k])
                                       if shared["work"].get(k) else None for k, _ in COUNTER_LABELS},
            "identical": same})

    # ---- scaling E -> 2E
    scaling = None
    if not args.skip_scaling:
        rounds = max(1, args.scaling_repeat)
        estimate = 2.2 * shared["wall_s"] + 3.2 * shared["wall_s"] * (rounds - 1)
        elapsed = time.perf_counter() - T0
        if args.time_budget and elapsed + estimate > args.time_budget:
            log(f"scaling check skipped: ~{estimate:.0f} s would exceed the time budget ({args.time_budget:.0f} s)")
            scaling = {"skipped": "time budget"}
        else:
            scaling = measure_scaling(model, tok, name, splits, e1, shared, bound, modes, average, forced, args,
                                      device, rounds)
    figures["scaling"] = scaling

    # ---- training benchmark (own process: its own peak memory)
    train = None
    if not args.skip_train:
        del model
        if forced is not None:
            forced.model = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        estimate = 60.0
        elapsed = time.perf_counter() - T0
        if args.time_budget and elapsed + estimate > args.time_budget:
            log("training benchmark skipped: it would exceed the time budget")
            train = {"skipped": "time budget"}
        else:
            log(f"training benchmark (tiny config, {args.train_steps} steps after {args.train_warmup} warm-up) ...")
            out_json = os.path.join(wd, "train.json")
            cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_train.py"), "--device", device,
                   "--steps", str(args.train_steps), "--warmup", str(args.train_warmup),
                   "--work-dir", os.path.join(wd, "train_root"), "--json", out_json, "--seed", str(args.seed)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                log(f"training benchmark failed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
                train = {"failed": r.returncode, "stderr": r.stderr[-3000:]}
            else:
                with open(out_json, "r", encoding="utf-8") as f:
                    train = json.load(f)
                log("training benchmark done")
    figures["train"] = train

    # ---- report
    print("", flush=True)
    print(f"== eval benchmark: {name} on {figures['device_name']} ({figures['dtype']}); {len(modes)} mode(s)"
          + (" + selective averaging" if average else "") + f"; {sp.num_videos} video(s) {sp.frames} frames, "
          f"{e1} expressions/video = {n_exp * len(modes)} predictions", flush=True)
    for line in table(naive, shared, bound) + phase_table(naive, shared):
        print(line, flush=True)
    if naive is not None:
        print(f"speedup (naive/shared wall, whole evaluation): {speedup:.2f}x; model time only: "
              f"{figures['eval']['speedup_model']:.2f}x", flush=True)
    if shared.get("cuda_peak_mb") is not None:
        print("CUDA peak memory (torch.cuda.max_memory_allocated): "
              + (f"naive {naive['cuda_peak_mb']:.0f} MB, " if naive is not None else "")
              + f"shared {shared['cuda_peak_mb']:.0f} MB", flush=True)
    print(f"shared work / lower bound: worst {worst:.2f} ("
          + ", ".join(f"{lab} {ratios[k]:.2f}" for k, lab in COUNTER_LABELS if ratios[k] is not None) + ")", flush=True)
    if same is not None:
        for line in identity_lines(same, len(files), exact=figures["dtype"] == "float32" and device == "cpu"):
            print(line, flush=True)
    if scaling and "increase_pct" in scaling:
        for line in scaling_lines(scaling):
            print(line, flush=True)
        print(f"scaling (shared path): {e1} -> {2 * e1} expressions/video: {scaling['wall_s'][0]:.2f} s -> "
              f"{scaling['wall_s'][1]:.2f} s wall (+{scaling['increase_pct']:.1f}%)", flush=True)
    elif scaling:
        print(f"scaling: skipped ({scaling['skipped']})", flush=True)
    if train and "steps_per_s" in train:
        print(_format_train(train), flush=True)
    elif train:
        print(f"train: {'skipped (' + train['skipped'] + ')' if 'skipped' in train else 'FAILED'}", flush=True)
    figures["speedup"] = speedup
    figures["total_s"] = time.perf_counter() - T0
    if args.json:
        atomic_write_json(args.json, figures, indent=1)
        print(f"figures written to {args.json}", flush=True)
    if naive is None:
        pct = f"{scaling['increase_pct']:.1f}" if scaling and "increase_pct" in scaling else "-"
        print(f"scaling_pct {pct} work_over_lower_bound {worst:.2f}", flush=True)
    else:
        print(f"speedup {speedup:.2f} work_over_lower_bound {worst:.2f}", flush=True)


def _format_train(r: dict) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from benchmark_train import format_result
    finally:
        sys.path.pop(0)
    return format_result(r)


if __name__ == "__main__":
    sys.exit(main())
