#!/usr/bin/env python
"""Check a MeViS PNG submission folder against the split and pack it as the server's zip.

    python tools/make_submission_zip.py --ann-dir OUT/Annotations --split-dir DATA/mevis/valid --out OUT/valid.zip
    python tools/make_submission_zip.py --results OUT/results.json --ann-dir OUT/Annotations ...  # write PNGs first
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.sasasa2va.evaluation.submission import (  # noqa: E402
    PNG_WORKERS,
    check_results_against_split,
    check_zip_target,
    pack_submission,
    write_submission_pngs,
)
from projects.sasasa2va.utils.cli import (  # noqa: E402
    output_dir_problem,
    output_file_problem,
    positive_int,
    run_reporting_user_errors,
)


def make_zip(args) -> None:
    """Check the output paths first (a file under a file is found before the PNGs are written), then write
    the PNGs of --results (if given), check the folder and pack it."""
    check_zip_target(args.out)
    problem = output_file_problem(args.out, "--out") or \
        (args.results and output_dir_problem(args.ann_dir, "--ann-dir"))  # --ann-dir is written only then
    if problem:
        raise ValueError(problem)
    if args.results:
        check_results_against_split(args.results, args.split_dir)
        n = write_submission_pngs(args.results, args.ann_dir, workers=args.workers, progress=not args.no_progress)
        print(f"wrote {n} PNGs to {args.ann_dir}")
    info = pack_submission(args.ann_dir, args.out, args.split_dir, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {info['zip']}: {info['num_videos']} videos, {info['num_expressions']} expressions, "
          f"{info['num_png']} PNGs")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ann-dir", required=True, help="folder <video>/<exp_id>/<frame>.png")
    p.add_argument("--split-dir", required=True, help="split folder with meta_expressions.json and JPEGImages/")
    p.add_argument("--out", required=True, help="zip to write (outside --ann-dir; an earlier zip there is replaced, "
                                                "any other file is refused)")
    p.add_argument("--results", help="optional results.json: write its masks as PNGs into --ann-dir first")
    p.add_argument("--workers", type=positive_int, default=PNG_WORKERS,
                   help="threads writing the PNGs of --results and checking the folder (default: %(default)s, "
                        "up to 8 cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return run_reporting_user_errors(make_zip, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
