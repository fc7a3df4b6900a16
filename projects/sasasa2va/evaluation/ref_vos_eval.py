#!/usr/bin/env python
"""Referring video object segmentation evaluation (MeViS-style splits).

Examples (from the repo root):
    python projects/sasasa2va/evaluation/ref_vos_eval.py HF_DIR --dataset MEVIS_U --mode uniform
    python projects/sasasa2va/evaluation/ref_vos_eval.py HF_DIR --dataset MEVIS --mode all --average --submit
    bash projects/sasasa2va/evaluation/dist_test.sh projects/sasasa2va/evaluation/ref_vos_eval.py HF_DIR 8 \\
        --dataset MEVIS_U --work-dir OUT --mode q_frame

One mode writes OUT/results.json (+ OUT/probs/, OUT/Annotations/ with --submit); several modes write
OUT/modes/<mode>/{results.json,probs/} and, with --average, the averaged OUT/results.json. Finished
expressions are kept in OUT[/modes/<mode>]/preds/, so rerunning a killed job resumes it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.evaluation.inference_flags import add_inference_flags, predict_options  # noqa: E402
from projects.sasasa2va.evaluation.runner import EvalOptions, parse_modes, run_evaluation  # noqa: E402
from projects.sasasa2va.evaluation.sharding import SCHEMES  # noqa: E402
from projects.sasasa2va.evaluation.splits import split_names  # noqa: E402
from projects.sasasa2va.utils.cli import run_reporting_user_errors  # noqa: E402


def _csv(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']; a list without an item is a mistake (for --videos it would mean every video)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: empty list; leave the option out instead")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="exported HF model folder")
    p.add_argument("--dataset", default="MEVIS",
                   help=f"split name: {', '.join(split_names())}, or any name with --split-dir (default: %(default)s)")
    p.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                   help="output folder (default: work_dirs/eval/<dataset>_<mode>; several modes: <dataset>_<m1>+<m2>..., all five: <dataset>_all)")
    p.add_argument("--mode", default="uniform",
                   help="inference mode, comma list of modes, or 'all' (default: %(default)s)")
    p.add_argument("--average", action="store_true", help="average the modes' probabilities into OUT/results.json")
    p.add_argument("--average-members", type=_csv, default=None,
                   help="comma list of modes (or other run dirs) to average (default: all given modes)")
    p.add_argument("--average-threshold", type=float, default=None,
                   help="threshold of the mean probability, with --average (default: 0.5)")
    p.add_argument("--submit", action="store_true", help="also write Annotations/<video>/<exp>/<frame>.png (0/255)")
    p.add_argument("--blind-expression", default=None, metavar="TEXT",
                   help="language-blind control: use TEXT as the expression of every object")
    p.add_argument("--max-videos", type=int, default=None, help="only the first N videos (quick runs)")
    p.add_argument("--videos", type=_csv, default=None, help="comma list of video ids to evaluate")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype; auto = bf16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--no-remote-code", dest="remote_code", action="store_false",
                   help="load with the repo's SaSaSa2VAChatModel instead of the folder's remote code")
    p.add_argument("--shard-by", default="video", choices=SCHEMES,
                   help="distribute whole videos (default) or interleaved expressions (DistributedSampler)")
    p.add_argument("--launcher", default="none", choices=("none", "pytorch"))
    p.add_argument("--data-root", default=None, help="data root of the split table (default: <repo>/data)")
    p.add_argument("--split-dir", default=None, help="split folder (JPEGImages/ + meta file), overrides the table")
    p.add_argument("--qframe-file", default=None, help="selected_frames.json for q_frame mode")
    p.add_argument("--retry-failed", action="store_true", help="on resume, recompute expressions that failed")
    p.add_argument("--overwrite", action="store_true", help="discard earlier predictions in the work dir")
    p.add_argument("--dist-timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks / collective timeout (default: 6 h)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--naive", action="store_true",
                   help="recompute every (expression, mode) from scratch instead of computing each video once "
                        "(slow; the benchmark baseline; same outputs)")
    p.add_argument("--feature-budget-mb", type=float, default=None, metavar="MB",
                   help="bound on the SAM2 frame features cached for the current video; frames evicted past it "
                        "are recomputed (default: keep the whole video)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated answer tokens, >= 1 (default: the model's 2048; smoke runs of barely "
                        "trained models)")
    p.add_argument("--model-factory", default=None, help=argparse.SUPPRESS)  # tests: module:function
    add_inference_flags(p)
    return p


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    threshold = {}
    if args.average_threshold is not None:  # given: it must have an average to apply to
        if not (args.average or args.average_members):
            raise ValueError("--average-threshold thresholds the averaged probabilities: add --average "
                             "(or --average-members)")
        threshold = {"average_threshold": args.average_threshold}
    return EvalOptions(
        hf_dir=args.hf_dir, dataset=args.dataset, work_dir=args.work_dir, modes=parse_modes(args.mode),
        average=args.average, average_members=args.average_members, **threshold,
        submit=args.submit, blind_expression=args.blind_expression, max_videos=args.max_videos, videos=args.videos,
        dtype=args.dtype, device=args.device, remote_code=args.remote_code, shard_by=args.shard_by,
        launcher=args.launcher, data_root=args.data_root, split_dir=args.split_dir, qframe_file=args.qframe_file,
        model_factory=args.model_factory, retry_failed=args.retry_failed, overwrite=args.overwrite,
        dist_timeout=args.dist_timeout, progress=args.progress, naive=args.naive,
        feature_budget_mb=args.feature_budget_mb,
        predict_options={**predict_options(args),
                         **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens})})


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.launcher == "pytorch":
        from projects.sasasa2va.utils.launch import die_with_parent

        die_with_parent()  # under torchrun: no orphaned rank when the launcher is killed
    rank = int(os.environ.get("RANK", "0")) if args.launcher == "pytorch" else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        opts = options_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_reporting_user_errors(run_evaluation, opts)
    except KeyboardInterrupt:
        print(f"interrupted: finished expressions are kept under {opts.work_dir}; rerun the same command to "
              f"resume", file=sys.stderr)
        return 130


def _entry() -> int:
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(main)()


if __name__ == "__main__":
    sys.exit(_entry())
