#!/usr/bin/env python
"""Overlay GIFs (prediction | ground truth) per expression and an index.html page.

    python tools/visualize.py --split-dir DATA/mevis/valid_u --results OUT/results.json --out OUT/vis \\
        [--max-expressions 50] [--csv OUT/mevis_valu_per_expression.csv]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.sasasa2va.evaluation.visualize import visualize_split  # noqa: E402
from projects.sasasa2va.utils.cli import output_dir_problem, run_reporting_user_errors  # noqa: E402


def write_page(args) -> None:
    """The GIFs and index.html (main checked the options)."""
    items = visualize_split(args.split_dir, args.results, args.out, args.max_expressions, args.csv,
                            args.max_side, args.fps, args.max_frames)
    print(f"wrote {len(items)} GIFs and {os.path.join(args.out, 'index.html')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split-dir", required=True)
    p.add_argument("--results", required=True, help="results.json")
    p.add_argument("--out", required=True, help="output folder (gifs/ and index.html)")
    p.add_argument("--max-expressions", type=int, default=None, help="GIFs for the first N expressions (default: all)")
    p.add_argument("--csv", default=None, help="per-expression metrics CSV or JSON from tools/eval_mevis.py")
    p.add_argument("--max-side", type=int, default=480, help="longest side of each panel in pixels")
    p.add_argument("--max-frames", type=int, default=None, help="subsample long videos to this many frames")
    p.add_argument("--fps", type=float, default=8.0, help="GIF frame rate (default: 8)")
    args = p.parse_args(argv)
    if not args.fps > 0 or args.max_side < 16:  # (not "<= 0": NaN too)
        p.error("--fps must be > 0 and --max-side >= 16")
    if (args.max_expressions is not None and args.max_expressions < 1) or \
            (args.max_frames is not None and args.max_frames < 1):
        p.error("--max-expressions and --max-frames must be >= 1")
    problem = output_dir_problem(args.out, "--out")  # a file, or under one: refused before any GIF is made
    if problem:
        p.error(problem)
    return run_reporting_user_errors(write_page, args)


if __name__ == "__main__":
    sys.exit(main())
