#!/usr/bin/env python
"""Generate the seeded synthetic Ref-VOS / Ref-Seg data in every layout the project reads.

Example:
    .venv/bin/python tools/make_synthetic_data.py --root data/synthetic
    .venv/bin/python tools/make_synthetic_data.py --root /tmp/long --formats mevis,qframe \\
        --num-train-videos 0 --num-valid-u-videos 2 --num-valid-videos 0 --extra-lengths 100,130
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.datasets.synthetic import (  # noqa: E402
    FORMATS,
    GENERATED_ENTRIES,
    SyntheticOptions,
    generate_all,
    parse_sizes,
    planned_info,
)
from projects.sasasa2va.utils.cli import output_dir_problem, run_reporting_user_errors  # noqa: E402

logger = logging.getLogger("make_synthetic_data")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _int_list(text: str) -> tuple[int, ...]:
    """'100,130' -> (100, 130); a list without a number is a mistake, not 'none'."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of integers, e.g. 100,130") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: no length given; leave the option out for none")
    return out


def as_flags(message: str) -> str:
    """The library's messages name SyntheticOptions fields; on the command line they are the flags of the
    same names (num_train_videos -> --num-train-videos)."""
    names = [f.name for f in dataclasses.fields(SyntheticOptions)] + ["seed"]
    return re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticOptions()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Same --seed and options => byte-identical files. Layouts: "
               "mevis/{train,valid_u,valid}, mevis_q_frame/{valid,valid_u}, revos/, rvos/, "
               "sam_v_full/ + Ref-SAV.json, ref_seg/{refcoco,refcoco+,refcocog}/.",
    )
    p.add_argument("--root", "--out", dest="root", default="data/synthetic", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="world seed, >= 0 (default: %(default)s)")
    p.add_argument("--num-train-videos", type=int, default=d.num_train_videos, help="MeViS train videos (default: %(default)s)")
    p.add_argument("--num-valid-u-videos", type=int, default=d.num_valid_u_videos, help="MeViS valid_u videos, with GT (default: %(default)s)")
    p.add_argument("--num-valid-videos", type=int, default=d.num_valid_videos, help="MeViS valid videos, no GT (default: %(default)s)")
    p.add_argument("--num-revos-videos", type=int, default=d.num_revos_videos, help="ReVOS videos (default: %(default)s)")
    p.add_argument("--num-rvos-videos", type=int, default=d.num_rvos_videos, help="Ref-YouTube-VOS videos (default: %(default)s)")
    p.add_argument("--num-sav-videos", type=int, default=d.num_sav_videos, help="Ref-SAV mp4 videos (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=d.num_images, help="RefCOCO/+/g images (default: %(default)s)")
    p.add_argument("--min-frames", type=int, default=d.min_frames, help="shortest video, frames (default: %(default)s)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help="longest video, frames (default: %(default)s)")
    p.add_argument("--extra-lengths", type=_int_list, default=(),
                   help="comma list of exact lengths; one extra valid_u and valid video per length, e.g. 100,130")
    p.add_argument("--sizes", type=parse_sizes, default=d.sizes,
                   help="comma list of WIDTHxHEIGHT frame sizes (default: 320x180,256x192)")
    p.add_argument("--min-objects", type=int, default=d.min_objects, help="objects per video, min (default: %(default)s)")
    p.add_argument("--max-objects", type=int, default=d.max_objects, help="objects per video, max <= 4 (default: %(default)s)")
    p.add_argument("--min-object-size", type=float, default=d.min_object_size, help="object diameter / shorter frame side, min (default: %(default)s)")
    p.add_argument("--max-object-size", type=float, default=d.max_object_size, help="object diameter / shorter frame side, max (default: %(default)s)")
    p.add_argument("--motion-expression-prob", type=float, default=d.motion_expression_prob,
                   help="per object, probability of an extra motion expression (default: %(default)s)")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma list out of {','.join(FORMATS)} (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true",
                   help="replace synthetic data made with other settings in --root (its generated folders are "
                        "removed first, so no video of the earlier data stays behind)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="logging level (default: %(default)s)")
    return p


def prepare_root(root: str, planned: dict, force: bool) -> None:
    """--root may be new, hold other files, or hold synthetic data: made with the same settings it is
    regenerated (the same bytes); with other settings only --force replaces it (else the earlier data's
    extra videos would stay, mixed with the new ones). ``planned``: planned_info of this run."""
    problem = output_dir_problem(root, "--root")
    if problem:
        raise ValueError(problem)
    info_path = os.path.join(root, "synthetic_info.json")
    if not os.path.isfile(info_path):
        return
    with open(info_path, "r", encoding="utf-8") as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError:
            info = {}
    recorded = {"seed": (info.get("summary") or {}).get("seed"), "options": info.get("options")}
    if recorded == planned:
        return
    if not force:
        changed = sorted(k for k in planned["options"] if (recorded["options"] or {}).get(k) != planned["options"][k])
        if recorded["seed"] != planned["seed"]:
            changed.insert(0, "seed")
        raise ValueError(f"--root {root} holds synthetic data made with other settings ({', '.join(changed)} "
                         f"differ, see {info_path}); --force replaces it, or choose another --root")
    for name in GENERATED_ENTRIES:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
    logger.info("--force: removed the earlier synthetic data under %s", root)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_reporting_user_errors(generate, args)


def generate(args: argparse.Namespace) -> None:
    """Check every option and --root (before announcing any work), then generate."""
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    options = dict(
        num_train_videos=args.num_train_videos, num_valid_u_videos=args.num_valid_u_videos,
        num_valid_videos=args.num_valid_videos, num_revos_videos=args.num_revos_videos,
        num_rvos_videos=args.num_rvos_videos, num_sav_videos=args.num_sav_videos,
        num_images=args.num_images, min_frames=args.min_frames, max_frames=args.max_frames,
        extra_lengths=args.extra_lengths, sizes=args.sizes, min_objects=args.min_objects,
        max_objects=args.max_objects, min_object_size=args.min_object_size,
        max_object_size=args.max_object_size, motion_expression_prob=args.motion_expression_prob,
        formats=formats)
    try:
        planned = planned_info(args.seed, **options)  # the options' checks, in the flags' names
    except ValueError as exc:
        raise ValueError(as_flags(str(exc))) from exc
    prepare_root(args.root, planned, args.force)
    t0 = time.time()
    logger.info("generating %s under %s (seed %d)", ",".join(formats), args.root, args.seed)
    summary = generate_all(args.root, seed=args.seed, progress=not args.quiet, **options)
    print(json.dumps(summary, indent=1))
    logger.info("done in %.1f s", time.time() - t0)


if __name__ == "__main__":
    sys.exit(main())
