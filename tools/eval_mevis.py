#!/usr/bin/env python
"""Score MeViS-style predictions (results.json or a PNG folder) against a split with ground truth.

    python tools/eval_mevis.py --split-dir DATA/mevis/valid_u --results OUT/results.json
    python tools/eval_mevis.py --split-dir DATA/mevis/valid_u --pred-dir OUT/Annotations

An expression without any prediction scores J = F = 0, as the official scorer scores a missing video (a
missing frame of a present expression counts as an empty mask); a results.json of a partial run
(--max-videos / --videos) is therefore scored low unless --only-present is given. Results
holding expressions the split does not have are refused. The last output line is always `J&F <v> J <v> F <v>` (percent, two decimals), for scripts to parse.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.sasasa2va.metrics.jf import evaluate_split, format_summary_line  # noqa: E402
from projects.sasasa2va.utils.cli import (  # noqa: E402
    exit_user_error, output_file_problem, positive_int, run_reporting_user_errors,
)
from projects.sasasa2va.utils.io import atomic_write_json, atomic_write_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split-dir", required=True, help="split folder with meta_expressions.json, mask_dict.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--results", help="results.json with RLE masks")
    src.add_argument("--pred-dir", help="PNG folder <video>/<exp_id>/<frame>.png (nonzero = foreground)")
    p.add_argument("--csv", help="per-expression CSV (default: mevis_valu_per_expression.csv beside results.json, "
                                 "or beside (not inside) the --pred-dir folder; replaced if present)")
    p.add_argument("--json", help="summary JSON (default: mevis_valu.json, in the same place as the CSV)")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="worker processes (default: the cores, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--only-present", action="store_true",
                   help="score only the expressions that --results holds (partial runs); default: all of the "
                        "split's, absent ones scored 0")
    args = p.parse_args(argv)
    if args.only_present and not args.results:
        p.error("--only-present needs --results")
    return args


def out_dir_for(args) -> str:
    """Outputs go next to results.json, or next to (beside, not inside) the PNG folder."""
    if args.results:
        return os.path.dirname(os.path.abspath(args.results))
    return os.path.dirname(os.path.abspath(os.path.normpath(args.pred_dir)))


def rows_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video", "exp_id", "J", "F", "J&F", "num_frames"])
    for r in rows:
        w.writerow([r["video"], r["exp_id"], f"{r['J']:.6f}", f"{r['F']:.6f}", f"{r['J&F']:.6f}", r["num_frames"]])
    return buf.getvalue()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.split_dir, "split dir"), (args.pred_dir, "prediction dir")):
        if path is not None and not os.path.isdir(path):
            exit_user_error(f"{what} not found: {path}")
    if args.results is not None and not os.path.isfile(args.results):
        exit_user_error(f"results file not found: {args.results}")
    d = out_dir_for(args)
    csv_path = args.csv or os.path.join(d, "mevis_valu_per_expression.csv")
    json_path = args.json or os.path.join(d, "mevis_valu.json")
    problem = output_file_problem(csv_path, "--csv") or output_file_problem(json_path, "--json")
    if problem:
        exit_user_error(problem)
    warnings.showwarning = _show_warning
    return run_reporting_user_errors(score_and_report, args, csv_path, json_path)


def score_and_report(args, csv_path: str, json_path: str) -> None:
    """Score the predictions, write the CSV and JSON, print the summary (main checked the paths)."""
    scores = evaluate_split(args.split_dir, results_path=args.results, pred_dir=args.pred_dir,
                            workers=args.workers, only_present=args.only_present, progress=not args.no_progress)
    if os.path.isfile(json_path):  # an earlier summary must not outlive a kill between the two writes beside
        os.unlink(json_path)      # the new CSV (the pair would then describe two different runs)
    atomic_write_text(csv_path, rows_csv(scores["rows"]))
    summary = {
        # percent, rounded like the reference script; "fractions" keeps the unrounded means
        "J&F": round(100 * scores["J&F"], 2), "J": round(100 * scores["J"], 2), "F": round(100 * scores["F"], 2),
        "fractions": {"J&F": scores["J&F"], "J": scores["J"], "F": scores["F"]},
        "num_videos": scores["num_videos"], "num_expressions": scores["num_expressions"],
        "split_dir": os.path.abspath(args.split_dir),
        "source": os.path.abspath(args.results or args.pred_dir),
        "num_missing": len(scores["missing"]), "missing": scores["missing"], "only_present": args.only_present,
        "rows": scores["rows"],  # J, F, J&F per expression as fractions in [0, 1]
    }
    atomic_write_json(json_path, summary, indent=1)
    absent = sum("J = F = 0" in n for n in scores["missing"])
    if absent and scores["results_meta"].get("subset"):
        print(f"note: {args.results} comes from a partial run (--max-videos / --videos); its "
              f"{absent} absent expression(s) are scored J = F = 0. Rerun with "
              f"--only-present to score only the evaluated ones.", file=sys.stderr)
    sys.stderr.flush()
    print(f"{'split':<14}{os.path.basename(os.path.normpath(args.split_dir))}")
    print(f"{'videos':<14}{scores['num_videos']}")
    print(f"{'expressions':<14}{scores['num_expressions']}")
    print(f"{'missing':<14}{len(scores['missing'])}")
    print(f"{'csv':<14}{csv_path}")
    print(f"{'json':<14}{json_path}")
    print("-" * 30)
    for k in ("J", "F", "J&F"):
        print(f"{k:<14}{100 * scores[k]:6.2f}")
    print(format_summary_line(scores), flush=True)


if __name__ == "__main__":
    sys.exit(main())
