#!/usr/bin/env python
"""Selective averaging: pick the ensemble member set on a split with ground truth, or apply one.

Select (greedy forward selection on J&F, prints every step, writes the chosen set):
    python tools/select_modes.py --runs work_dirs/valid_u_runs --split-dir DATA/mevis/valid_u --out chosen.json
Apply a chosen set (or, without --members-json/--members, all five modes present) to another split:
    python tools/select_modes.py --runs work_dirs/valid_runs --split-dir DATA/mevis/valid \\
        --members-json chosen.json --write-results work_dirs/ensemble_valid/results.json

--runs takes run dirs (with probs/ or results.json) or folders of them; runs are named by folder name.
--min-iou X (both): per expression, the members whose mask has an IoU below X with the consensus of all of
them are left out of its mean (spec evaluation §3.3 (c)).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.sasasa2va.evaluation.averaging import (  # noqa: E402
    default_members, discover_runs, greedy_select, run_name, write_ensemble_results)
from projects.sasasa2va.utils.cli import output_file_problem, positive_int, run_reporting_user_errors  # noqa: E402
from projects.sasasa2va.utils.io import atomic_write_json  # noqa: E402


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {text!r} is not a number") from None


def parse_weights(specs, names):
    """--weights as one number per run, or NAME=W pairs (missing names weigh 1)."""
    if not specs:
        return None
    if all("=" in s for s in specs):
        table = {}
        for s in specs:
            k, v = s.split("=", 1)
            if k not in names:
                raise ValueError(f"--weights: unknown run {k!r}; runs are {names}")
            table[k] = _number(v, f"--weights {k}")
        return [table.get(n, 1.0) for n in names]
    values = [_number(s, "--weights") for s in specs]
    if len(values) != len(names):
        raise ValueError(f"--weights: {len(values)} values for {len(names)} runs {names}")
    return values


def read_members_json(path: str) -> dict:
    """A chosen set written by a selection: names (+ weights, voting, threshold, min_iou)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            chosen = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--members-json {path}: not valid JSON ({exc})") from None
    except OSError as exc:  # missing, a folder, unreadable: say which option named it
        raise ValueError(f"--members-json {path}: cannot read it ({exc.strerror or exc})") from None
    names = chosen.get("names") if isinstance(chosen, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--members-json {path}: expected a chosen set with a non-empty list 'names' (as "
                         f"select_modes.py --out writes)")
    weights = chosen.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(names):
            raise ValueError(f"--members-json {path}: 'weights' must list one number per name")
        chosen["weights"] = [_number(w, f"--members-json {path}: weight") for w in weights]
    return chosen


def evaluation_runs(runs):
    """The runs an evaluation wrote (probs/, preds/ or run_config.json): outputs must stay out of them. A
    folder holding only an earlier ensemble's results.json is not one (it may be written again)."""
    return [r for r in runs if any(os.path.exists(os.path.join(r, n)) for n in ("probs", "preds", "run_config.json"))]


def check_output(path: str, flag: str, overwrite: bool, runs=()) -> None:
    """An output file may be new, or (with --overwrite) replace a file -- never a folder, a file in an
    unwritable place, or a file inside one of the runs (e.g. a member run's own results.json)."""
    target = os.path.abspath(path)
    for r in runs:
        if os.path.commonpath([target, os.path.abspath(r)]) == os.path.abspath(r):
            raise ValueError(f"{flag} {path}: inside the run {r}; write the ensemble outside the runs")
    problem = output_file_problem(path, flag)  # a folder, or an unwritable place
    if problem:
        raise ValueError(problem)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{flag} {path}: exists; pass --overwrite to replace it")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True,
                   help="run dirs (with probs/ or results.json) or folders of them; a run is named by its folder")
    p.add_argument("--split-dir", required=True, help="the split the runs were made on (selection: with ground truth)")
    p.add_argument("--out", help="chosen set JSON to write (selection)")
    p.add_argument("--voting", choices=("probs", "binary"), default=None,
                   help="mean of probabilities or of binary masks (default: the --members-json's, else probs)")
    p.add_argument("--threshold", type=float, default=None,
                   help="threshold of the mean (default: the --members-json's, else 0.5)")
    p.add_argument("--weights", nargs="+", help="one weight per run, or NAME=W pairs (default: equal weights)")
    p.add_argument("--max-members", type=int, default=None, help="largest member set tried (default: all runs)")
    p.add_argument("--min-iou", type=float, default=None,
                   help="per-expression selection: before each expression's mean, drop the members whose mask "
                        "has an IoU below this with the consensus of all of them (selection: every candidate set "
                        "is scored so; apply: default the --members-json's, else off)")
    p.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                   help="processes scoring candidate sets (default: the cores, at most 8; each holds one "
                        "expression's probabilities of every run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--write-results", help="apply mode: write the ensemble's results.json here")
    members = p.add_mutually_exclusive_group()  # a chosen set names its members: two lists would conflict
    members.add_argument("--members-json",
                         help="apply mode: chosen set written by a selection (its names, weights, voting, "
                              "threshold and min IoU; explicit --voting/--threshold/--weights/--min-iou win; not "
                              "with --members)")
    members.add_argument("--members", nargs="+",
                         help="apply mode: member run names, space- or comma-separated (default: the five "
                              "modes' runs)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="apply mode: accept members lacking expressions (each is averaged over the members "
                        "that have it); default: refused")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --write-results file")
    args = p.parse_args(argv)
    if args.out and args.write_results:
        p.error("--out (selection) and --write-results (apply a set) are two modes; give one")
    if args.max_members is not None and args.max_members < 1:
        p.error("--max-members must be >= 1")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        p.error("--threshold must be in (0, 1)")
    if args.min_iou is not None and not 0.0 <= args.min_iou <= 1.0:  # (not "< 0 or > 1": NaN too)
        p.error("--min-iou must be in [0, 1]")
    return run_reporting_user_errors(select_or_apply, args)


def select_or_apply(args) -> None:
    """Apply a member set (--write-results) or select one (--out); main checked the options."""
    try:
        for given in args.runs:
            if os.path.isdir(os.path.join(given, "modes")):
                print(f"note: {given} is a multi-mode evaluation folder; its runs are in {given}/modes "
                      f"(pass --runs {os.path.join(given, 'modes')})", file=sys.stderr)
        runs = discover_runs(args.runs)
        names = [run_name(r) for r in runs]
        if args.write_results:
            weights_by_name = {}
            voting, threshold = args.voting or "probs", 0.5 if args.threshold is None else args.threshold
            min_iou = args.min_iou
            if args.members_json:
                chosen = read_members_json(args.members_json)
                member_names = chosen["names"]
                weights_by_name = dict(zip(member_names, chosen.get("weights") or [1.0] * len(member_names)))
                voting = args.voting or chosen.get("voting", voting)
                if voting not in ("probs", "binary"):
                    raise ValueError(f"--members-json {args.members_json}: voting {voting!r}, expected probs or binary")
                threshold = args.threshold if args.threshold is not None else \
                    _number(chosen.get("threshold", threshold), f"--members-json {args.members_json}: threshold")
                if min_iou is None and chosen.get("min_iou") is not None:
                    min_iou = _number(chosen["min_iou"], f"--members-json {args.members_json}: min_iou")
            elif args.members:
                member_names = [n.strip() for item in args.members for n in item.split(",") if n.strip()]
            else:
                member_names = [run_name(r) for r in default_members(runs)]
                if not member_names:
                    raise ValueError(f"no run of the five modes among {names}; pass --members")
            missing = [n for n in member_names if n not in names]
            if missing:
                raise ValueError(f"member run(s) {missing} not found among {names}")
            members = [runs[names.index(n)] for n in member_names]
            check_output(args.write_results, "--write-results", args.overwrite, evaluation_runs(runs))
            w = parse_weights(args.weights, member_names) if args.weights else \
                ([weights_by_name[n] for n in member_names] if weights_by_name else None)
            meta = write_ensemble_results(members, args.write_results, args.split_dir, weights=w,
                                          threshold=threshold, voting=voting, allow_incomplete=args.allow_incomplete,
                                          progress=not args.no_progress, min_iou=min_iou)
            dropping = f", members below IoU {min_iou} with the consensus dropped" if min_iou else ""
            print(f"wrote {args.write_results}: {meta['num_expressions']} expressions, members "
                  f"{' + '.join(meta['members'])} ({voting} voting, threshold {threshold}{dropping})")
            return
        if not args.out:
            raise ValueError("selection needs --out (or use --write-results to apply a set)")
        check_output(args.out, "--out", args.overwrite, evaluation_runs(runs))
        res = greedy_select(runs, args.split_dir, weights=parse_weights(args.weights, names),
                            threshold=0.5 if args.threshold is None else args.threshold,
                            voting=args.voting or "probs", max_members=args.max_members,
                            workers=args.workers, log=lambda s: print(s, flush=True), progress=not args.no_progress,
                            min_iou=args.min_iou)
    except KeyError as e:  # e.g. a probs .npz without its array
        raise ValueError(str(e)) from None
    print(res["table"])
    out = {k: res[k] for k in ("names", "weights", "J", "F", "J&F", "threshold", "voting", "min_iou", "steps")}
    out["run_dirs"] = [os.path.abspath(r) for r in res["members"]]
    out["split_dir"] = os.path.abspath(args.split_dir)
    atomic_write_json(args.out, out, indent=1)
    print(f"chosen: {' + '.join(res['names'])}  J&F {100 * res['J&F']:.2f} J {100 * res['J']:.2f} "
          f"F {100 * res['F']:.2f}  -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
