"""The model an evaluation runs: an exported folder (checked before anything is written), loaded with its
own code or this repository's classes (or a test factory), on the rank's device and dtype."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import uuid
from typing import TYPE_CHECKING, Callable

from projects.sasasa2va.evaluation.distributed import DistContext

if TYPE_CHECKING:
    from projects.sasasa2va.evaluation.runner import EvalOptions


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32 or bfloat16")
    return table[dtype]


def _import_factory(spec: str) -> Callable:
    """'pkg.module:function' or 'path/to/file.py:function'."""
    if ":" not in spec:
        raise ValueError(f"model factory {spec!r} must look like module:function or file.py:function")
    target, func = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: model factory file not found")
        name = "_eval_model_factory_" + uuid.uuid5(uuid.NAMESPACE_URL, path).hex
        mod = sys.modules.get(name)
        if mod is None:
            s = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[name] = mod
            s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(target)
    if not hasattr(mod, func):
        raise AttributeError(f"model factory {spec!r}: no function {func!r}")
    return getattr(mod, func)


CHAT_MODEL_TYPES = ("sasasa2va_chat", "sa2va_chat")  # this repository's exports; the official Sa2VA-family ones


def check_hf_dir(hf_dir: str) -> None:
    """An exported model folder (convert_to_hf.py --save-path), not e.g. a training work dir."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: HF model folder not found")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ValueError(f"{hf_dir}: not an exported model folder (no config.json); make one from a training "
                         f"checkpoint with: python projects/sasasa2va/hf/convert_to_hf.py CONFIG --pth-model PTH "
                         f"--save-path HF_DIR")
    with open(os.path.join(hf_dir, "config.json"), "r", encoding="utf-8") as f:
        try:
            model_type = json.load(f).get("model_type")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{hf_dir}/config.json: not a model config ({exc})") from None
    if model_type not in CHAT_MODEL_TYPES:
        raise ValueError(f"{hf_dir}/config.json: model_type {model_type!r}, expected one of {CHAT_MODEL_TYPES} (an "
                         f"export of convert_to_hf.py, or an official Sa2VA / SaSaSa2VA export)")
    check_weight_files(hf_dir)


def check_weight_files(hf_dir: str) -> None:
    """Every ``*.safetensors`` of the folder has a readable header that its size covers (a junk or cut-short
    file is named here, before the model loads, instead of a SafetensorError from deep in from_pretrained)."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(hf_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(hf_dir, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def load_model(opts: EvalOptions, ctx: DistContext, hf_dir_checked: bool = False):
    """(model, tokenizer) in eval mode on ctx.device. Remote code by default, the repo's own classes
    with remote_code=False, or a test factory. ``hf_dir_checked``: the caller has run check_hf_dir on
    ``opts.hf_dir`` (run_evaluation does, before it creates the work dir), so its files are not read again."""
    import torch

    dtype = resolve_dtype(opts.dtype, ctx.device)
    if opts.model_factory is not None:
        factory = opts.model_factory if callable(opts.model_factory) else _import_factory(opts.model_factory)
        return factory(hf_dir=opts.hf_dir, device=ctx.device, dtype=dtype, remote_code=opts.remote_code,
                       rank=ctx.rank)
    from transformers import AutoModel, AutoTokenizer

    if not hf_dir_checked:
        check_hf_dir(opts.hf_dir)
    kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=True)
    if opts.remote_code:
        model = AutoModel.from_pretrained(opts.hf_dir, trust_remote_code=True, **kwargs)
    else:
        from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import SaSaSa2VAChatModel

        model = SaSaSa2VAChatModel.from_pretrained(opts.hf_dir, **kwargs)
    model = model.to(torch.device(ctx.device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(opts.hf_dir, trust_remote_code=opts.remote_code)
    fill_token_ids(model.config, tokenizer, opts.hf_dir)
    return model, tokenizer


def fill_token_ids(config, tokenizer, where: str) -> None:
    """Official exports' config.json names neither the [SEG] nor the <IMG_CONTEXT> token id (their code
    looks them up in the tokenizer); this repository's model reads them from the config: fill them in."""
    from projects.sasasa2va.hf.models.inference import token_id
    from projects.sasasa2va.hf.models.templates import IMG_CONTEXT_TOKEN, SEG_TOKEN

    for attr, token in (("seg_token_id", SEG_TOKEN), ("img_context_token_id", IMG_CONTEXT_TOKEN)):
        if getattr(config, attr, None) is not None:
            continue
        tid = token_id(tokenizer, token)
        if tid is None:
            raise ValueError(f"{where}: config.json has no {attr} and the tokenizer has no {token} token")
        setattr(config, attr, tid)
