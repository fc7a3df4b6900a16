"""Checks of a tool's inputs beyond argparse: the config file a tool runs (train.py, convert_to_hf.py,
make_tiny_pretrained.py). Each problem is a ValueError naming the file or option, so
that it ends as ``error: ...`` / status 2 rather than as a traceback from deep inside mmengine or a model's
constructor."""
from __future__ import annotations

import copy
import inspect
import os


def load_tool_config(path: str, cfg_options: dict | None = None, required: tuple = ()):
    """mmengine ``Config.fromfile(path)`` with ``cfg_options`` merged in; every top-level key of
    ``required`` must then be a dict, and ``model`` (when required) must take every key it is given --
    all checked here, before anything slow is built."""
    from mmengine.config import Config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as exc:  # mmengine parses .py configs with ast: line and text are kept
        where = f" ({exc.text.strip()!r})" if exc.text else ""
        raise ValueError(f"{path}: syntax error at line {exc.lineno}{where}: {exc.msg}") from exc
    except Exception as exc:  # JSON / YAML parse errors, other suffixes, errors raised while the file runs
        raise ValueError(f"{path}: not a readable Python config ({type(exc).__name__}: {exc})") from exc
    if cfg_options:
        try:  # a copy: merging consumes '_delete_' keys
            cfg.merge_from_dict(copy.deepcopy(dict(cfg_options)))
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path}: --cfg-options do not fit the config ({type(exc).__name__}: {exc})") from exc
    for key in required:
        config_section(cfg, key, path, required=True)
    if "model" in required:
        _check_model_keys(cfg.model, path)
    return cfg


def config_section(cfg, key: str, path: str, required: bool = False) -> dict:
    """The dict at dotted ``key`` of ``cfg`` ({} when absent and not ``required``)."""
    node, seen = cfg, []
    for part in key.split("."):  # each level is checked to be a dict before the next is read
        seen.append(part)
        node = node.get(part)
        name = ".".join(seen)
        if node is None:
            if required:
                raise ValueError(f"{path}: missing key {name!r} (not a training config?)")
            return {}
        if not isinstance(node, dict):
            raise ValueError(f"{path}: {name!r} must be a dict, got {type(node).__name__} {node!r}")
    return node


def _check_model_keys(model_cfg: dict, path: str) -> None:
    """The keys of ``model`` are its constructor's keyword arguments: name an unknown one here instead of
    a TypeError from MODELS.build."""
    cls = model_cfg.get("type")
    if cls is None:
        raise ValueError(f"{path}: 'model' has no 'type'")
    if isinstance(cls, str):
        from mmengine.registry import MODELS

        cls = MODELS.get(cls)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # not introspectable (or not found): MODELS.build reports it
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in model_cfg if k not in ("type", "_scope_") and k not in params]
    if unknown:
        raise ValueError(f"{path}: the model ({getattr(cls, '__name__', cls)}) does not take {unknown[0]!r}"
                         f"{f' (nor {unknown[1:]})' if len(unknown) > 1 else ''}; check the key's spelling "
                         f"in the config or --cfg-options")
