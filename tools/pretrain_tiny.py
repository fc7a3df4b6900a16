#!/usr/bin/env python
"""Stand-in pretraining of the tiny model (the tiny config's stand-in for the Sa2VA checkpoint).

    python tools/pretrain_tiny.py [projects/sasasa2va/configs/sasasa2va_tiny.py] [--steps 200]
        [--accumulate 8] [--lr 1e-3] [--word-target insert|relabel] [--threads N] [--force] [--cfg-options key=value ...]

Trains the tiny MLLM to name the referred object (colour, else shape, else masked colour) right after
each [SEG] (LM head frozen) and
writes it into the config's ``model.pretrained_pth`` plus ``stand_in_pretraining.json`` beside it; see
projects/sasasa2va/models/stand_in_pretraining.py for why. Missing synthetic data / tiny checkpoints are
created first (the config's ``auto_prepare``). Defaults come from the config's
``auto_prepare.stand_in_pretraining``. Skipped when the marker exists; ``--force`` rebuilds the random
tiny checkpoints and runs again. Run from the folder the config's relative paths refer to (the repo root).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_CONFIG = os.path.join("projects", "sasasa2va", "configs", "sasasa2va_tiny.py")


def main(argv=None) -> int:
    from projects.sasasa2va.utils.cli import CfgOptionsAction, positive_int, run_reporting_user_errors

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config file (default: {DEFAULT_CONFIG})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (config default: 200)")
    p.add_argument("--accumulate", type=int, default=None, help="samples per step (config default: 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (config default: 1e-3)")
    p.add_argument("--word-target", choices=("insert", "relabel"), default=None,
                   help="how each [SEG] is taught its word: inserted after it, or as the label of the next "
                        "token (config default: insert)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--force", action="store_true",
                   help="run again (from freshly written random tiny checkpoints) even if the marker says it was done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--cfg-options", nargs="+", action=CfgOptionsAction, help="override config entries, key=value")
    args = p.parse_args(argv)
    for name in ("steps", "accumulate"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be > 0")
    if not os.path.isfile(args.config):
        p.error(f"config not found: {args.config}")
    return run_reporting_user_errors(pretrain, p, args)


def pretrain(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Load the config (errors name it), then run the stand-in pretraining unless its marker says done."""
    import torch

    from projects.sasasa2va.models.stand_in_pretraining import (
        finish_cut_short_save, marker_path, run_stand_in_pretraining,
    )
    from projects.sasasa2va.utils.tool_inputs import load_tool_config
    from tools.benchmark_train import ensure_config_imports
    from tools.train import auto_prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_config_imports()
    cfg = load_tool_config(args.config, args.cfg_options, required=("model",))
    prep = dict(cfg.get("auto_prepare") or {})  # what train.py would prepare, less the stand-in pretraining
    spec = dict(prep.pop("stand_in_pretraining", None) or {})
    tiny = dict(prep.get("tiny_pretrained") or {})
    if not cfg.model.get("pretrained_pth"):
        raise ValueError(f"{args.config}: model.pretrained_pth is not set (the checkpoint the stand-in "
                         f"pretraining writes)")
    marker = marker_path(cfg.model.pretrained_pth)
    if restore_before_force(tiny, cfg.model.pretrained_pth, marker):
        print(f"restored {cfg.model.pretrained_pth} and {marker} as they were before a --force run that was cut "
              f"short", file=sys.stderr)
    settled = finish_cut_short_save(cfg.model.pretrained_pth)
    if settled:
        print(f"a pretraining cut short during its last renames was {settled} ({marker})", file=sys.stderr)
    if os.path.isfile(marker) and not args.force:
        print(f"already done ({marker}); --force to run again")
        return
    cfg.auto_prepare = prep
    for name in ("steps", "accumulate", "lr", "word_target"):
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    if not os.path.isfile(marker):
        auto_prepare(cfg)  # data and random tiny checkpoints, if missing
        record = run_stand_in_pretraining(cfg, progress=not args.no_progress, **spec)
    else:  # --force: start again from fresh random checkpoints; the current ones come back if that fails
        from projects.sasasa2va.models.tiny import make_tiny_pretrained

        if not tiny:
            p.error("--force needs the config's auto_prepare.tiny_pretrained to rebuild the random checkpoints")
        pth = cfg.model.pretrained_pth
        for path, backup in zip((pth, marker), before_force(pth, marker)):
            shutil.copy2(path, backup + ".part")  # complete copies only under the backup names
            os.replace(backup + ".part", backup)
        try:
            make_tiny_pretrained(**tiny)  # also removes the marker
            auto_prepare(cfg)
            record = run_stand_in_pretraining(cfg, progress=not args.no_progress, **spec)
        except BaseException:
            restore_before_force(tiny, pth, marker)
            print(f"stand-in pretraining failed: {pth} and {marker} are restored as they were", file=sys.stderr)
            raise
        for backup in before_force(pth, marker):
            os.remove(backup)
    print(f"loss {record['loss_first']} -> {record['loss_last']} in {record['seconds']} s; "
          f"{record['seg_tokens_named']}/{record['seg_tokens']} [SEG] tokens named; wrote {record['pth']}")


def before_force(pth: str, marker: str) -> tuple[str, str]:
    """Where a --force run keeps the earlier pretrained checkpoint and its marker until it has finished."""
    return pth + ".before_force", marker + ".before_force"


def restore_before_force(tiny: dict, pth: str, marker: str) -> bool:
    """Put back what a --force run that failed, or was killed (no except clause runs then), replaced: the
    random tiny checkpoints are rebuilt first if their rewrite was cut short (no manifest; same settings,
    same files), then the earlier pretrained checkpoint and marker are renamed back. False: nothing to do."""
    from projects.sasasa2va.models.tiny import make_tiny_pretrained

    backups = [b for b in before_force(pth, marker) if os.path.exists(b)]
    if not backups:
        return False
    if tiny and not os.path.isfile(os.path.join(tiny["out_dir"], "tiny_manifest.json")):
        make_tiny_pretrained(**tiny)
    for path, backup in zip((pth, marker), before_force(pth, marker)):
        if os.path.exists(backup):
            os.replace(backup, path)
    return True


if __name__ == "__main__":
    sys.exit(main())
