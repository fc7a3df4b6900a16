"""Build the chat model from official checkpoints: InternVL folders, SAM2 .pt, Sa2VA .pth.

Every load checks key names and shapes and fails with the offending keys instead of the reference's
silent ``strict=False`` (spec model_training.md §8). Order used by training (reference §1.10):
``load_internvl_folder`` -> ``add_special_tokens`` -> ``load_sam2_checkpoint`` -> ``load_sa2va_pth``
-> ``lora.apply_lora``.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.modeling_utils import no_init_weights

from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import SaSaSa2VAChatConfig
from projects.sasasa2va.hf.models.modeling_intern_vit import InternVisionModel
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import SaSaSa2VAChatModel, build_language_model
from projects.sasasa2va.hf.models.sam2_grounding import load_official_sam2_weights
from projects.sasasa2va.hf.models.templates import IMG_CONTEXT_TOKEN, SEG_TOKEN, SPECIAL_TOKENS

SA2VA_PREFIX = "mllm.model."
MLLM_PREFIXES = ("vision_model", "language_model", "mlp")
# Parameter groups an InternVL folder does not have: they come from SAM2 / Sa2VA files or stay fresh.
INTERNVL_MISSING_OK = ("grounding_encoder.*", "text_hidden_fcs.*")
# Non-persistent buffers some older exports saved; safe to drop.
IGNORABLE_KEYS = ("*.rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------- key mapping
def sa2va_key_to_hf(key: str) -> str:
    """Sa2VA .pth / training key -> chat-model key: drop 'mllm.model.', '.gamma' -> '.g_weight'."""
    if key.startswith(SA2VA_PREFIX):
        key = key[len(SA2VA_PREFIX):]
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "g_weight"
    return key


def hf_key_to_sa2va(key: str) -> str:
    """Inverse of ``sa2va_key_to_hf`` (tools/convert_to_pth.py layout)."""
    if key.startswith(MLLM_PREFIXES):
        key = SA2VA_PREFIX + key
    if key.endswith(".g_weight"):
        key = key[: -len("g_weight")] + "gamma"
    return key


# ------------------------------------------------------------------------------- reports
@dataclass
class LoadReport:
    """What a checked load did; ``ignored`` are allow-listed extras, ``allowed_missing`` allow-listed gaps."""

    source: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, file shape, model shape)
    ignored: list = field(default_factory=list)
    allowed_missing: list = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {len(self.loaded)} tensors, allowed missing {len(self.allowed_missing)}, "
            f"ignored {len(self.ignored)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape mismatches {len(self.mismatched)}"
        )

    def raise_if_bad(self) -> None:
        if not (self.missing or self.unexpected or self.mismatched):
            return
        parts = [self.summary()]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.mismatched)):
            if items:
                shown = ", ".join(str(i) for i in items[:20])
                more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
                parts.append(f"{name}: {shown}{more}")
        raise ValueError("\n".join(parts))


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict:
    """key -> all keys sharing its storage (tied embeddings): loading one satisfies the others."""
    by_ptr: dict = {}
    for key, tensor in state.items():
        by_ptr.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(key)
    return {key: group for group in by_ptr.values() for key in group}


def check_and_load(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    source: str,
    allow_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = IGNORABLE_KEYS,
    report: Optional[LoadReport] = None,
    finalize: bool = True,
) -> LoadReport:
    """Copy ``tensors`` into ``model`` by name after checking names and shapes.

    With ``finalize`` False only this chunk is loaded (sharded files); missing keys are computed and
    the report is checked when ``finalize`` is True.
    """
    report = report or LoadReport(source)
    state = model.state_dict()
    good = {}
    for key, value in tensors.items():
        if key not in state:
            (report.ignored if _matches(key, ignore_unexpected) else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(state[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(state[key].shape)))
        else:
            good[key] = value
    if report.unexpected or report.mismatched:
        report.raise_if_bad()
    model.load_state_dict(good, strict=False)
    report.loaded.extend(good)
    if finalize:
        loaded = set(report.loaded)
        aliases = _alias_groups(state)
        for key in state:
            if key in loaded or any(a in loaded for a in aliases.get(key, ())):
                continue
            (report.allowed_missing if _matches(key, allow_missing) else report.missing).append(key)
        report.raise_if_bad()
    return report


# ------------------------------------------------------------------------------- InternVL folders
def read_internvl_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"InternVL folder {path}: config.json not found")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "internvl_chat":
        raise ValueError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, expected 'internvl_chat'")
    return cfg


def safetensors_files(path: str) -> list:
    """``model.safetensors``, or the shards listed in ``model.safetensors.index.json`` (in order)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' missing or empty")
        files = sorted(set(weight_map.values()))
        paths = [os.path.join(path, name) for name in files]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{index} lists {os.path.basename(p)}, which is missing in {path}")
        return paths
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"InternVL folder {path}: neither model.safetensors nor model.safetensors.index.json")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (a 26B model would not fit twice in host RAM in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _mark_initialized(module: torch.nn.Module) -> None:
    """Skip transformers' weight init for modules whose weights are loaded right after."""
    for sub in module.modules():
        sub._is_hf_initialized = True


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """AutoTokenizer from the folder. InternLM2 folders ship their tokenizer as remote code: pass
    ``trust_remote_code=True`` explicitly to run the folder's tokenization_internlm2.py."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if not trust_remote_code and "trust_remote_code" in str(err):
            raise ValueError(
                f"{path}: the tokenizer needs remote code (InternLM2); call with trust_remote_code=True "
                f"if you trust the files in that folder"
            ) from err
        raise


def load_internvl_folder(
    path: str,
    sam2_config,
    template: str,
    dtype: torch.dtype = torch.float32,
    extra_config: Optional[dict] = None,
    trust_remote_code: bool = False,
):
    """Official InternVL folder -> (SaSaSa2VAChatModel, tokenizer).

    ViT, mlp1 and LLM weights must all be in the safetensors (missing keys other than
    ``grounding_encoder.*`` / ``text_hidden_fcs.*`` raise, unexpected keys raise). The grounding
    encoder is built from ``sam2_config`` with fresh weights (load them with ``load_sam2_checkpoint``).
    ``trust_remote_code`` is only used for the tokenizer (InternLM2 folders need it).
    """
    raw = read_internvl_config(path)
    overrides = dict(extra_config or {})
    overrides.update(sam2_config=sam2_config, template=template)
    config = SaSaSa2VAChatConfig.from_internvl_config(raw, **overrides)
    config.torch_dtype = dtype
    tokenizer = load_tokenizer(path, trust_remote_code)
    ctx_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if ctx_id is None or tokenizer.convert_ids_to_tokens(ctx_id) != IMG_CONTEXT_TOKEN:
        raise ValueError(f"{path}: the tokenizer has no {IMG_CONTEXT_TOKEN} token")
    config.img_context_token_id = int(ctx_id)
    files = safetensors_files(path)
    with default_dtype(dtype):
        with no_init_weights():
            vision_model = InternVisionModel(config.vision_config)
            language_model = build_language_model(config.llm_config)
        _mark_initialized(vision_model)
        _mark_initialized(language_model)
        model = SaSaSa2VAChatModel(config, vision_model=vision_model, language_model=language_model)
    report = LoadReport(path)
    for i, file in enumerate(files):
        check_and_load(
            model, load_file(file), file, allow_missing=INTERNVL_MISSING_OK, report=report,
            finalize=i == len(files) - 1,
        )
    model.load_report = report
    return model, tokenizer


# ------------------------------------------------------------------------------- special tokens
def add_special_tokens(model: SaSaSa2VAChatModel, tokenizer, tokens: Sequence[str] = SPECIAL_TOKENS) -> int:
    """Add the Sa2VA tokens (in order, special) and resize the LLM embeddings/head if any is new.

    Sets and returns ``config.seg_token_id`` (first id of "[SEG]" encoded without BOS/EOS).
    New rows get the LLM's normal init (transformers 4.42 behaviour, no mean resizing); they are
    overwritten by a Sa2VA .pth or trained.
    """
    added = tokenizer.add_tokens(list(tokens), special_tokens=True)
    if added > 0:
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.llm_config.vocab_size = len(tokenizer)
    seg_ids = tokenizer(SEG_TOKEN, add_special_tokens=False).input_ids
    if not seg_ids:
        raise ValueError(f"tokenizer encodes {SEG_TOKEN!r} to nothing")
    model.config.seg_token_id = int(seg_ids[0])
    return model.config.seg_token_id


# ------------------------------------------------------------------------------- SAM2 / Sa2VA files
def _grounding_target(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "grounding_encoder"):
        model = model.grounding_encoder
    return model.sam2_model if hasattr(model, "sam2_model") else model


def load_sam2_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Official SAM2 checkpoint ``{'model': state_dict}`` -> grounding_encoder.sam2_model, strict."""
    load_official_sam2_weights(_grounding_target(model), path)


def _is_peft_wrapped(model: torch.nn.Module) -> bool:
    return any(".base_model.model." in k or "lora_" in k for k in model.state_dict())


def load_sa2va_pth(
    model: SaSaSa2VAChatModel,
    path: str,
    allow_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = IGNORABLE_KEYS,
) -> LoadReport:
    """Sa2VA pretrained .pth (flat dict or under 'state_dict') -> the whole chat model.

    Keys are mapped with ``sa2va_key_to_hf``. Unexpected keys (other than ``ignore_unexpected``),
    shape mismatches and missing keys (other than ``allow_missing`` patterns) raise. Must run
    before LoRA is applied (plain module names).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Sa2VA checkpoint not found: {path}")
    if _is_peft_wrapped(model):
        raise ValueError(f"load_sa2va_pth({path}): the model already has LoRA; load the .pth before apply_lora")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    mapped = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        mapped[sa2va_key_to_hf(key)] = value
    report = check_and_load(model, mapped, path, allow_missing=allow_missing, ignore_unexpected=ignore_unexpected)
    model.load_report = report
    return report
