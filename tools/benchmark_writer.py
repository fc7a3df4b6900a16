#!/usr/bin/env python
"""The evaluation's output stage at real frame sizes, with the model's GPU time simulated (issue 6).

    python tools/benchmark_writer.py                                   # ~80 frames of 1280x720, both bounds
    python tools/benchmark_writer.py --frames 20 --size 640x360 --outputs 40

A video's outputs (masks + uint8 probabilities of every (mode, expression)) come in a burst once its answers
are decoded; each goes through the runner's own store (``runner._write_output``: npz of the probabilities,
RLE masks, preds JSON, fsynced) on the output writer's threads. The model's thread may queue outputs up
to a bound in bytes and then waits. Here the model is a sleep (a GPU computes while its host thread
waits, the GIL released): ``--model-s`` per video before its outputs, ``--output-ms`` per output. Object-like
outputs (an ellipse moving over the frames, a soft edge). For each ``--pending-mb`` bound: wall time, the
model thread's waits for room in the queue and for the last writes. Last line:
``writer_bound <mb> wall_s <a> waited_s <b>`` for each bound, the last bound's figures last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from projects.sasasa2va.utils.cli import (  # noqa: E402
    exit_user_error, positive_int, run_reporting_user_errors, size_wxh,
)


def object_like_probs(frames: int, h: int, w: int) -> np.ndarray:
    """uint8 round(255 p) of an ellipse of half the frame's size moving over the frames, a soft edge."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((frames, h, w), np.uint8)
    for t in range(frames):
        d = ((yy - h / 2 - h / 12 * np.sin(t / 9)) / (h / 4)) ** 2 + ((xx - w / 2 - w / 12 * np.cos(t / 9)) / (w / 4)) ** 2
        logit = np.clip(24.0 * (1.0 - d), -30.0, 30.0)
        out[t] = np.rint(255.0 / (1.0 + np.exp(-logit)))
    return out


def run(probs: np.ndarray, videos: int, outputs: int, model_s: float, output_ms: float, threads: int,
        pending_bytes: int, work_dir: str) -> dict:
    from projects.sasasa2va.evaluation import runner
    from projects.sasasa2va.evaluation.output_writer import BackgroundWriter
    from projects.sasasa2va.evaluation.predictions import ExpressionOutput, ExpressionTask

    frames, h, w = probs.shape
    names = [f"{t:05d}" for t in range(frames)]
    stats = runner.RankStats()
    t0 = time.perf_counter()
    with BackgroundWriter(max_pending=runner.WRITER_MAX_PENDING, threads=threads,
                          max_pending_bytes=pending_bytes) as writer:
        for v in range(videos):
            time.sleep(model_s)
            for k in range(outputs):
                time.sleep(output_ms / 1000.0)
                p = probs.copy()  # a fresh array per output, as the model makes them
                out = ExpressionOutput("ok", "[SEG]", p > 127, p, 10)
                task = ExpressionTask(k, f"v{v}", str(k), "x", "x")
                runner._write_output(work_dir, task, names, out, (h, w), stats, writer)
        waited = writer.wait_seconds
    return {"wall_s": time.perf_counter() - t0, "waited_s": waited, "close_s": writer.close_seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--frames", type=positive_int, default=80, help="frames per video (default: %(default)s)")
    p.add_argument("--size", type=size_wxh, default="1280x720", help="frame size WxH (default: %(default)s)")
    p.add_argument("--videos", type=positive_int, default=3, help="videos (default: %(default)s)")
    p.add_argument("--outputs", type=positive_int, default=12,
                   help="outputs stored per video: distinct (mode, expression) predictions (default: %(default)s)")
    p.add_argument("--model-s", type=float, default=2.0, help="simulated model seconds per video (default: %(default)s)")
    p.add_argument("--output-ms", type=float, default=10.0,
                   help="simulated model milliseconds per output (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="writer threads (default: the runner's, a quarter of the cores, at most 4)")
    p.add_argument("--pending-mb", default="512,auto",
                   help="comma-separated queue bounds in MB to compare; 'auto' = the runner's default "
                        "(output_writer.writer_pending_bytes) (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, removed)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from projects.sasasa2va.evaluation.output_writer import writer_pending_bytes, writer_threads

    w, h = args.size
    if not args.model_s >= 0 or not args.output_ms >= 0:
        exit_user_error("--model-s and --output-ms must be >= 0")
    threads = writer_threads() if args.threads is None else args.threads
    if threads < 0:
        exit_user_error("--threads must be >= 0")
    bounds = []
    for item in args.pending_mb.split(","):
        item = item.strip()
        try:
            bounds.append(writer_pending_bytes() if item == "auto" else int(float(item) * 2**20))
        except (ValueError, OverflowError):
            exit_user_error(f"--pending-mb: {item!r} is neither a number of MB nor 'auto'")
        if bounds[-1] <= 0:
            exit_user_error("--pending-mb bounds must be > 0")
    probs = object_like_probs(args.frames, h, w)
    held = probs.nbytes * 2  # the probabilities and the masks of one output
    print(f"output: {args.frames} frames of {w}x{h}, {held / 2**20:.0f} MB held per output; {args.videos} videos x "
          f"{args.outputs} outputs; model {args.model_s:g} s per video + {args.output_ms:g} ms per output; "
          f"{threads} writer thread(s)", flush=True)
    lines = []
    for bound in bounds:
        scratch = args.work_dir or tempfile.mkdtemp(prefix="benchmark_writer_")
        try:
            r = run(probs, args.videos, args.outputs, args.model_s, args.output_ms, threads, bound, scratch)
        finally:
            if args.work_dir is None:
                shutil.rmtree(scratch, ignore_errors=True)
        model = args.videos * (args.model_s + args.outputs * args.output_ms / 1000.0)
        print(f"bound {bound / 2**20:.0f} MB ({bound // held} outputs): wall {r['wall_s']:.2f} s (model alone "
              f"{model:.2f} s), the model thread waited {r['waited_s']:.2f} s for room and {r['close_s']:.2f} s for "
              f"the last writes", flush=True)
        lines.append(f"writer_bound {bound / 2**20:.0f} wall_s {r['wall_s']:.2f} waited_s {r['waited_s']:.2f}")
    print(" ; ".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_reporting_user_errors(main))
