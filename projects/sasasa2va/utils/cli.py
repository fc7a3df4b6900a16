"""argparse pieces and error reporting shared by the command-line tools."""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mmengine.config import DictAction


class CfgOptionsAction(DictAction):
    """mmengine's ``--cfg-options key=value ...`` parser, with a usage error (not a traceback) for an
    item without ``=``."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if "=" not in v]
        if bad:
            parser.error(f"{option_string} {bad[0]!r}: expected key=value (e.g. train_cfg.max_epochs=1)")
        try:
            super().__call__(parser, namespace, values, option_string)
        except (ValueError, SyntaxError) as exc:
            raise argparse.ArgumentError(self, f"cannot parse {values}: {exc}") from None


def output_file_problem(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written as an output file (checked before a long run, not after it), or None."""
    if os.path.isdir(path):
        return f"{flag} {path}: is a folder; give a file path"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{flag} {path}: {parent} is not writable"
    return None


def output_dir_problem(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be used or made as an output folder (checked before a long run), or None: the
    folder counterpart of ``output_file_problem``."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path}: exists and is not a folder"
    if os.path.isdir(path):
        return None if os.access(path, os.W_OK) else f"{flag} {path}: is not writable"
    return output_file_problem(path, flag)  # a new folder: its nearest existing ancestor must be a writable folder


def positive_int(text: str) -> int:
    """argparse ``type`` of a count that must be >= 1 (workers, threads, tokens): 0 or less is a usage error
    naming the option, not a silent default or a traceback after the work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def size_wxh(text: str) -> tuple[int, int]:
    """argparse ``type`` of a frame size 'WxH' (positive integers) -> (W, H)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(v.strip().isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected WxH with positive integers, e.g. 640x360, got {text!r}")
    return int(parts[0]), int(parts[1])


def exit_user_error(message: str) -> NoReturn:
    """A bad option found after parsing, before the work: ``error: message`` and status 2, as argparse's
    usage errors (``raise SystemExit("error: ...")`` would exit with status 1)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def device_problem(device: str | None, flag: str = "--device") -> str | None:
    """Why ``device`` cannot run the model here (checked before a model is loaded), or None. None and
    "auto" mean: CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"{flag} {device}: expected cpu, cuda or cuda:N"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"{flag} {device}: expected cpu, cuda or cuda:N (other device types are not supported)"
    if not torch.cuda.is_available():
        return f"{flag} {device}: no CUDA device on this machine; use {flag} cpu"
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        return f"{flag} {device}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})"
    return None


def resolve_device(device: str | None) -> str:
    """The device to run on: ``device`` as given, or for None / "auto" (which device_problem accepts) CUDA
    when available, else the CPU."""
    if device is not None and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_reporting_user_errors(fn, *args, **kwargs) -> int:
    """Run ``fn``; 0 when it returns. A ValueError / OSError -- a bad input, whose message names the file,
    key or option -- ends as ``error: ...`` and status 2 instead of a traceback (SASASA2VA_TRACEBACK=1
    re-raises it)."""
    try:
        fn(*args, **kwargs)
    except (ValueError, OSError) as exc:
        if os.environ.get("SASASA2VA_TRACEBACK"):
            raise
        print(f"error: {exc}\n(SASASA2VA_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
    return 0
