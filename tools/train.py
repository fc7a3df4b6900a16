#!/usr/bin/env python
"""Train a SaSaSa2VA config: xtuner's train entry (mmengine Runner / DeepSpeed FlexibleRunner), made
to work on machines without CUDA.

    python tools/train.py CONFIG [--work-dir DIR] [--deepspeed NAME|JSON|none] [--resume PATH|auto]
                          [--seed N] [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

Usually started through ``bash tools/dist.sh train CONFIG NUM_GPUS [args]``. What this file adds to
``xtuner.tools.train.main`` (which it calls with the same arguments):

* without CUDA: no DeepSpeed, ``AmpOptimWrapper`` -> ``OptimWrapper`` (float32), gloo backend, the
  process group is created here (mmengine's init calls ``torch.cuda.set_device``) and DDP wraps the
  CPU module (``device_ids=None``);
* ``--deepspeed deepspeed_zero2`` resolves to ``configs/deepspeed/deepspeed_zero2.json`` (then to
  xtuner's bundled file of that name); ``none`` disables DeepSpeed;
* ``--resume auto`` resumes from ``<work_dir>/last_checkpoint`` when there is one (else starts fresh);
  mmengine ``.pth`` checkpoints are loaded with ``torch.load(weights_only=True)`` plus an explicit
  allow-list for the non-tensor metadata mmengine stores in them (message hub HistoryBuffers, numpy
  scalars; see ``projects/sasasa2va/utils/checkpoint.py``). DeepSpeed resume folders (CUDA) are read by
  DeepSpeed itself with ``weights_only=False`` (and ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set for
  xtuner's seed lookup in them), so resume only from folders your own runs wrote. The base config's
  ``RNGStateHook`` stores the RNG states in every checkpoint, so a resumed CPU run reproduces the
  uninterrupted one bit for bit (tests/test_robustness_train_kill.py);
* the config's ``auto_prepare`` entry (tiny config) creates missing synthetic data / tiny checkpoints /
  the stand-in pretraining with the library functions behind tools/make_synthetic_data.py,
  tools/make_tiny_pretrained.py and tools/pretrain_tiny.py.

Checkpoints (``iter_<n>.pth``, the trainable weights under ``state_dict``), logs and the dumped config
land in the work dir (default ``work_dirs/<config stem>``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import logging
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.utils.checkpoint import (  # noqa: E402
    checkpoint_complete, complete_checkpoints, remove_stale_temp_checkpoints)

NO_DEEPSPEED = ("", "none", "None", "false", "False", "0")
DEEPSPEED_DIR = osp.join(ROOT, "configs", "deepspeed")


def build_parser() -> argparse.ArgumentParser:
    """Same options as xtuner's train CLI (``--resume`` also accepts 'auto')."""
    from projects.sasasa2va.utils.cli import CfgOptionsAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file path")
    p.add_argument("--work-dir", help="where checkpoints and logs go (default: work_dirs/<config stem>)")
    p.add_argument("--deepspeed", default=None,
                   help="DeepSpeed config: a name (deepspeed_zero2, ...), a .json path, or 'none'; ignored without CUDA")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (latest in the work dir)")
    p.add_argument("--seed", type=int, default=None, help="random seed (a resumed run keeps the checkpoint's seed)")
    p.add_argument("--cfg-options", nargs="+", action=CfgOptionsAction, help="override config entries, key=value")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return p


def log(msg: str, level: int = logging.INFO) -> None:
    from mmengine.logging import print_log

    print_log(f"[tools/train.py] {msg}", logger="current", level=level)


# ------------------------------------------------------------------------------------ resolution
def resolve_deepspeed(name: str | None, has_cuda: bool) -> str | None:
    """None when DeepSpeed is off (asked for, or no CUDA); else a JSON path or an xtuner config name."""
    if name is None or name in NO_DEEPSPEED:
        return None
    if not has_cuda:
        log(f"--deepspeed {name} ignored: CUDA is not available (training with mmengine's OptimWrapper on CPU)",
            logging.WARNING)
        return None
    if osp.isfile(name):
        return name
    local = osp.join(DEEPSPEED_DIR, name if name.endswith(".json") else name + ".json")
    if osp.isfile(local):
        return local
    from xtuner.configs import cfgs_name_path

    if name in cfgs_name_path:
        return name
    raise FileNotFoundError(f"--deepspeed {name!r}: not a file, not in {DEEPSPEED_DIR}, not an xtuner config name")


def default_work_dir(config: str) -> str:
    return osp.join("./work_dirs", osp.splitext(osp.basename(config))[0])


def latest_complete_checkpoint(work_dir: str) -> str | None:
    """``<work_dir>/last_checkpoint`` when it names a complete checkpoint; else (the file is missing,
    empty, or names a deleted / half-written checkpoint, e.g. after kill -9) the complete ``iter_<n>.pth``
    with the largest n."""
    recorded = None
    marker = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(marker):
        with open(marker, "r", encoding="utf-8") as f:
            recorded = f.read().strip() or None
    if recorded is not None and checkpoint_complete(recorded):
        return recorded
    found = complete_checkpoints(work_dir)
    best = osp.join(work_dir, found[-1]) if found else None
    if recorded is not None:
        log(f"--resume auto: {marker} names {recorded!r}, which is missing or incomplete; "
            f"{'using ' + best if best else 'no other complete checkpoint found'}", logging.WARNING)
    return best


def resolve_resume(resume: str | None, work_dir: str) -> str | None:
    """'auto' -> the work dir's latest complete checkpoint (None if there is none); a path must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = latest_complete_checkpoint(work_dir)
        if path is None:
            log(f"--resume auto: no checkpoint in {work_dir}; starting from scratch")
        else:
            log(f"--resume auto: resuming from {path}")
        return path
    if not osp.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    if not checkpoint_complete(resume):
        raise ValueError(f"--resume {resume}: not a complete checkpoint (cut short, or not a torch.save file); "
                         f"--resume auto picks the newest complete one of the work dir")
    return resume


def check_work_dir(work_dir: str, resume: str | None, cfg) -> None:
    """A new run must not write its checkpoints over an earlier run's; a resumed run must start from the
    base weights the run started from. A new run records them (rank 0)."""
    from projects.sasasa2va.utils.base_weights import base_weights_mismatch, record_base_weights

    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        for name in remove_stale_temp_checkpoints(work_dir):
            log(f"removed {name} (a checkpoint save cut short by a kill)")
    if resume is None:
        found = complete_checkpoints(work_dir)
        if found:
            raise ValueError(f"{work_dir} holds checkpoints of an earlier run ({', '.join(found[-3:])}); "
                             f"--resume auto continues it, --work-dir NEW starts another run")
        if main_rank:
            os.makedirs(work_dir, exist_ok=True)
            record_base_weights(work_dir, cfg)
        return
    problem = base_weights_mismatch(work_dir, cfg)
    if problem:
        raise ValueError(f"cannot resume in {work_dir}: {problem}; resume with the base weights the run "
                         f"started from")


# top-level config names that mmengine / xtuner read after the file is executed
RUNTIME_TOP_LEVEL = {"work_dir", "load_from", "resume", "launcher", "log_level", "default_scope", "randomness",
                     "env_cfg", "visualizer", "log_processor", "default_hooks", "custom_hooks", "model",
                     "train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler", "auto_prepare"}


def warn_top_level_options(options) -> None:
    """``--cfg-options max_epochs=1`` sets a top-level variable after the config file ran, so entries built
    from it (train_cfg.max_epochs) keep the old value: name the nested key instead."""
    for key in options or {}:
        if "." not in key and key not in RUNTIME_TOP_LEVEL:
            log(f"--cfg-options {key}=...: a top-level variable of the config is read only while the file runs; "
                f"entries made from it keep their value -- set the nested key instead (e.g. "
                f"train_cfg.max_epochs, optim_wrapper.optimizer.lr)", logging.WARNING)


# ------------------------------------------------------------------------------------ auto prepare
@contextlib.contextmanager
def file_lock(path: str):
    """Exclusive lock so that the ranks of one node create shared inputs once."""
    os.makedirs(osp.dirname(osp.abspath(path)) or ".", exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(folder: str, marker: str, make, command: str) -> None:
    if osp.isfile(osp.join(folder, marker)):
        return
    with file_lock(osp.normpath(folder) + ".lock"):
        if osp.isfile(osp.join(folder, marker)):  # made by another rank meanwhile
            return
        log(f"{folder} is missing; creating it (equivalent to: {command})")
        start = time.time()
        try:
            make()
        except Exception as exc:
            raise RuntimeError(f"could not create {folder} ({type(exc).__name__}: {exc}); "
                               f"create it by hand with: {command}") from exc
        log(f"created {folder} in {time.time() - start:.1f} s")


def auto_prepare(cfg) -> None:
    """Create the inputs named in ``cfg.auto_prepare`` (synthetic data, tiny checkpoints, stand-in
    pretraining), each only when its marker file is missing."""
    spec = cfg.get("auto_prepare")
    if not spec:
        return
    syn = dict(spec.get("synthetic_data") or {})
    if syn:
        from projects.sasasa2va.datasets.synthetic import generate_all

        root = syn.pop("root")
        seed = int(syn.pop("seed", 0))
        cmd = f"python tools/make_synthetic_data.py --root {root} --seed {seed}"
        _ensure(root, "synthetic_info.json", lambda: generate_all(root, seed=seed, **syn), cmd)
    tiny = dict(spec.get("tiny_pretrained") or {})
    if tiny:
        from projects.sasasa2va.models.tiny import check_tiny_manifest, make_tiny_pretrained, tiny_cli_args

        out_dir = tiny.pop("out_dir")
        cmd = " ".join(["python tools/make_tiny_pretrained.py --out", out_dir] + tiny_cli_args(tiny))
        _ensure(out_dir, "tiny_manifest.json", lambda: make_tiny_pretrained(out_dir, **tiny), cmd)
        check_tiny_manifest(out_dir, tiny, cmd)
    stand_in = dict(spec.get("stand_in_pretraining") or {})
    if stand_in:
        from projects.sasasa2va.models.stand_in_pretraining import (
            finish_cut_short_save, marker_path, run_stand_in_pretraining,
        )

        finish_cut_short_save(cfg.model.pretrained_pth)  # (before the marker is looked for)
        folder, marker = osp.split(marker_path(cfg.model.pretrained_pth))
        cmd = f"python tools/pretrain_tiny.py {cfg.filename}"
        _ensure(folder, marker, lambda: run_stand_in_pretraining(cfg, **stand_in), cmd)


# ------------------------------------------------------------------------------------ CPU patches
def _type_name(value) -> str:
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return getattr(value, "__name__", type(value).__name__)


def patch_for_cpu(cfg, launcher: str) -> None:
    """float32 OptimWrapper, gloo, DDP on CPU modules."""
    ow = cfg.optim_wrapper
    if _type_name(ow.get("type")) == "AmpOptimWrapper":
        ow.type = "OptimWrapper"  # registry name (a class object would break the config dump)
        for key in ("dtype", "loss_scale"):
            ow.pop(key, None)
        log("no CUDA: AmpOptimWrapper -> OptimWrapper (float32)")
    env = cfg.setdefault("env_cfg", {})
    env.setdefault("dist_cfg", {})["backend"] = "gloo"
    if launcher != "none" and cfg.get("model_wrapper_cfg") is None:
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                     find_unused_parameters=bool(cfg.get("find_unused_parameters", False)))


def init_cpu_process_group(timeout_s: int) -> None:
    """gloo process group from the torchrun environment (before mmengine, which would call
    torch.cuda.set_device)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from projects.sasasa2va.utils.launch import die_with_parent

    die_with_parent()  # under torchrun: no orphaned trainer when the launcher is killed
    import torch
    from mmengine.config import Config

    from projects.sasasa2va.utils.tool_inputs import load_tool_config

    has_cuda = torch.cuda.is_available()
    cfg = load_tool_config(args.config, args.cfg_options, required=("model", "optim_wrapper"))
    warn_top_level_options(args.cfg_options)
    work_dir = args.work_dir or cfg.get("work_dir") or default_work_dir(args.config)
    if osp.exists(work_dir) and not osp.isdir(work_dir):
        raise ValueError(f"--work-dir {work_dir}: exists and is not a folder")
    deepspeed = resolve_deepspeed(args.deepspeed, has_cuda)
    auto_prepare(cfg)
    resume = resolve_resume(args.resume, work_dir)
    check_work_dir(work_dir, resume, cfg)
    if resume is not None:
        if osp.isdir(resume):
            # DeepSpeed checkpoint folder (CUDA runs): DeepSpeed reads its files with weights_only=False
            # anyway; xtuner's seed lookup in mp_rank_00_model_states.pt gets the same treatment. Only
            # resume from folders your own runs wrote.
            os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        else:
            # mmengine/xtuner call torch.load(filename), weights_only=True by default since torch 2.6: allow
            # exactly the non-tensor metadata mmengine stores (HistoryBuffer + numpy), nothing else
            from projects.sasasa2va.utils.checkpoint import allow_mmengine_checkpoints

            allow_mmengine_checkpoints()
    if not has_cuda:
        if args.launcher == "pytorch":
            timeout = int(((cfg.get("env_cfg") or {}).get("dist_cfg") or {}).get("timeout", 1800))
            init_cpu_process_group(timeout)

    import xtuner.tools.train as xtuner_train

    class RunConfig(Config):
        """What xtuner's main loads: the file, with the CPU adjustments (cfg-options applied after)."""

        @staticmethod
        def fromfile(filename, *a, **kw):
            loaded = Config.fromfile(filename, *a, **kw)
            if not has_cuda:
                patch_for_cpu(loaded, args.launcher)
            return loaded

    xtuner_train.Config = RunConfig
    from projects.sasasa2va.utils.checkpoint import install_atomic_checkpoint_saves

    install_atomic_checkpoint_saves()
    new_argv = strip_options(argv, ("--work-dir", "--deepspeed", "--resume", "--launcher"))
    new_argv += ["--work-dir", work_dir, "--launcher", args.launcher]
    if deepspeed is not None:
        new_argv += ["--deepspeed", deepspeed]
    if resume is not None:
        new_argv += ["--resume", resume]
    sys.argv = [sys.argv[0]] + new_argv
    xtuner_train.main()


def strip_options(argv: list, names) -> list:
    """argv without the given single-value options (``--opt v`` and ``--opt=v`` forms); the rest,
    including the raw --cfg-options tokens, is passed to xtuner unchanged."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok in names:
            skip = True
            continue
        if any(tok.startswith(n + "=") for n in names):
            continue
        out.append(tok)
    return out


if __name__ == "__main__":
    try:
        import torch_npu  # noqa: F401  (Ascend, as the reference entry)
        from torch_npu.contrib import transfer_to_npu  # noqa: F401
    except ImportError:
        pass
    from projects.sasasa2va.utils.cli import run_reporting_user_errors

    sys.exit(run_reporting_user_errors(main))
