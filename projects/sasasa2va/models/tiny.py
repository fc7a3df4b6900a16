"""Tiny random-init checkpoints in the OFFICIAL layouts, so the whole pipeline runs on CPU.

``make_tiny_pretrained(out_dir)`` writes
  <out>/InternVL-tiny/   config.json (internvl_chat), model.safetensors (official key names),
                         a Qwen2-style byte-level BPE tokenizer trained offline (+ InternVL tokens)
  <out>/sam2_tiny.pt     {'model': state_dict} of the 'tiny' SAM2 preset
  <out>/sa2va_tiny.pth   a Sa2VA-style flat .pth (mllm.model.*, resized embeddings, SAM2, text_hidden_fcs)
Everything is deterministic for a given seed. Defaults: ViT 112 px / patch 14 -> 64 patches -> 16
tokens per image after pixel shuffle; LLM hidden 256, 4 layers.
"""
from __future__ import annotations

import io
import json
import os
import random
from typing import Optional

import torch
from safetensors.torch import save_file

from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import build_llm_config
from projects.sasasa2va.hf.models.configuration_intern_vit import InternVisionConfig
from projects.sasasa2va.hf.models.modeling_intern_vit import InternVisionModel
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import build_language_model, build_mlp1
from projects.sasasa2va.hf.models.templates import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from projects.sasasa2va.utils.io import atomic_write_bytes, atomic_write_json

ARCHS = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INTERNVL_TOKENS = [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
# Qwen2 pre-tokenisation pattern (the slow Qwen2Tokenizer applies the same split).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TINY_VOCAB_TARGET = 2048
TINY_LLM = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
TINY_VIT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
INTERNVL_DIR = "InternVL-tiny"
SAM2_FILE = "sam2_tiny.pt"
SA2VA_FILE = "sa2va_tiny.pth"

_COLOURS = "red green blue yellow purple orange pink brown black white gray grey cyan magenta golden silver dark light".split()
_SHAPES = "circle square triangle rectangle star ellipse diamond hexagon blob ring cross box ball disk object shape".split()
_MOTION = (
    "moving move moves left right up down upward downward forward backward fast slowly quickly still static "
    "stationary bouncing rotating spinning turning jumping sliding drifting approaching leaving entering exiting "
    "first second third last then after before while stops starts towards away across around center corner top bottom"
).split()
_FILLER = (
    "the a an of and or is are was to in on at by with from that this which who it its there their which "
    "one two three four five six seven eight nine ten please segment find show where can you what picture "
    "image video frame frames mask respond segmentation result sure it is in this clip clips of the object "
    "objects most biggest smallest largest other next behind front near far small big large tiny huge"
).split()
_QUESTIONS = [
    "Please segment {x} in this image.",
    "Can you segment the {x} in this image?",
    "Where is the {x} in this picture? Please respond with a segmentation mask.",
    "Please segment {x}.",
    "Could you please give me a segmentation mask of the {x}?",
    "What is {x} in this video? Please respond with a segmentation mask.",
]
_ANSWERS = ["It is {s}.", "Sure, {s}.", "Sure, it is {s}.", "Sure, the segmentation result is {s}.", "{s}."]


def _corpus(seed: int = 0, lines: int = 3000) -> list:
    """Deterministic training text: templates, object phrases, Clip_k answers, chat-template strings."""
    rng = random.Random(seed)
    clip_answer = ", ".join(f"Clip_{i}" for i in range(1, 11)) + "."
    out = [" ".join(_COLOURS), " ".join(_SHAPES), " ".join(_MOTION), " ".join(_FILLER), clip_answer,
           "0 1 2 3 4 5 6 7 8 9 10 100 2024", "<|user|>\n<|end|>\n<|assistant|>\n<|system|>\n"]
    words = _COLOURS + _SHAPES + _MOTION + _FILLER
    for _ in range(lines):
        phrase = f"{rng.choice(_COLOURS)} {rng.choice(_SHAPES)} {rng.choice(_MOTION)} {rng.choice(_MOTION)}"
        question = rng.choice(_QUESTIONS).format(x=phrase)
        answer = rng.choice(_ANSWERS).format(s=", ".join(f"Clip_{i}" for i in range(1, rng.randint(1, 10) + 1)))
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out.append(f"<|user|>\n{question}<|end|>\n<|assistant|>\n{answer}<|end|>")
        out.append(filler.capitalize() + rng.choice([".", "?", "!", ","]) + f" {rng.randint(0, 999)}")
    return out


def build_tiny_tokenizer(seed: int = 0, vocab_size: int = TINY_VOCAB_TARGET):
    """Byte-level BPE (Qwen2 pre-tokeniser) trained offline; Qwen specials and InternVL tokens appended
    after the base vocabulary, like the official tokenizer (ids: base, then specials, then InternVL)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL + INTERNVL_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
        model_max_length=32768,
    )


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """tokenizer.json + tokenizer_config.json, plus vocab.json/merges.txt so the slow class loads too."""
    tokenizer.save_pretrained(out_dir)
    tokenizer.backend_tokenizer.model.save(out_dir)


def tiny_vision_config(image_size: int = 112, six_b_style: bool = False) -> dict:
    """300M-style ViT (layer_norm, qkv bias) or 6B-style (rms_norm, q/k norm, no qkv bias)."""
    cfg = dict(TINY_VIT, image_size=image_size, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
               dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
               initializer_factor=1.0, use_flash_attn=False, architectures=["InternVisionModel"])
    if six_b_style:
        cfg.update(qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
    else:
        cfg.update(qkv_bias=True, qk_normalization=False, norm_type="layer_norm")
    return cfg


def tiny_llm_config(arch: str, tokenizer) -> dict:
    """LLM config dict for ``arch`` (a key of ARCHS) sized for CPU, untied head, vocab = len(tokenizer)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {sorted(ARCHS)}")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = dict(TINY_LLM, architectures=[ARCHS[arch]], vocab_size=len(tokenizer), hidden_act="silu",
               max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False,
               use_cache=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, rope_theta=1000000.0)
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=TINY_LLM["num_hidden_layers"])
    elif arch == "qwen3":
        cfg.update(head_dim=TINY_LLM["hidden_size"] // TINY_LLM["num_attention_heads"], use_sliding_window=False)
    elif arch == "internlm2":
        cfg.update(bias=False, rms_norm_eps=1e-5, rope_scaling={"type": "dynamic", "factor": 2.0})
    elif arch == "phi3":
        cfg.update(sliding_window=None, original_max_position_embeddings=4096)
    return cfg


def tiny_internvl_config(arch: str, tokenizer, image_size: int = 112) -> dict:
    """A config.json in the official InternVL layout (model_type internvl_chat)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": 0.5,
        "force_image_size": image_size,
        "select_layer": -1,
        "ps_version": "v2",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "pad2square": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vision_config": tiny_vision_config(image_size, six_b_style=arch == "internlm2"),
        "llm_config": tiny_llm_config(arch, tokenizer),
    }


def internvl_state_dict(config: dict, seed: int = 0) -> dict:
    """Random ``vision_model.* / mlp1.* / language_model.*`` tensors for an InternVL config dict."""
    torch.manual_seed(seed)
    vision_cfg = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    vision = InternVisionModel(InternVisionConfig(**vision_cfg))
    llm = build_language_model(build_llm_config(config["llm_config"]))
    mlp1 = build_mlp1(vision.config.hidden_size, llm.config.hidden_size, config["downsample_ratio"])
    state = {}
    for prefix, module in (("vision_model.", vision), ("mlp1.", mlp1), ("language_model.", llm)):
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach().clone().contiguous()
    return state


def save_safetensors(state: dict, out_dir: str, max_shard_bytes: Optional[int] = None) -> list:
    """``model.safetensors``, or HF-style shards + ``model.safetensors.index.json`` when sharding."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(state, os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for key in state:
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(
        os.path.join(out_dir, "model.safetensors.index.json"),
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
    )
    return names


def write_tiny_internvl(
    out_dir: str, arch: str = "qwen2", image_size: int = 112, seed: int = 0,
    max_shard_bytes: Optional[int] = None, tokenizer=None,
) -> str:
    """Write an official-layout InternVL folder (config.json, safetensors, tokenizer); returns its path."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(seed)
    os.makedirs(out_dir, exist_ok=True)
    config = tiny_internvl_config(arch, tokenizer, image_size)
    save_tokenizer(tokenizer, out_dir)
    save_safetensors(internvl_state_dict(config, seed), out_dir, max_shard_bytes)
    atomic_write_json(os.path.join(out_dir, "config.json"), config, indent=2, sort_keys=True)
    return out_dir


def write_tiny_sam2(path: str, seed: int = 0, sam2_config=None) -> str:
    """Official SAM2 checkpoint layout ``{'model': state_dict}`` ('.gamma' names) of the tiny preset."""
    from projects.sasasa2va.hf.models.sam2_grounding import SAM2Grounding, official_sam2_state_dict

    torch.manual_seed(seed)
    grounding = SAM2Grounding(sam2_config if sam2_config is not None else {"name": "tiny"})
    state = {k: v.detach().clone().contiguous() for k, v in official_sam2_state_dict(grounding.sam2_model).items()}
    _save_atomically({"model": state}, path)
    return path


def write_tiny_sa2va_pth(path: str, internvl_dir: str, sam2_path: str, seed: int = 0, sam2_config=None) -> str:
    """Sa2VA-style flat .pth: the tiny InternVL + 5 special tokens (resized), SAM2, text_hidden_fcs."""
    from projects.sasasa2va.models.builder import (
        add_special_tokens, hf_key_to_sa2va, load_internvl_folder, load_sam2_checkpoint,
    )

    sam2_config = sam2_config if sam2_config is not None else {"name": "tiny"}
    model, tokenizer = load_internvl_folder(internvl_dir, sam2_config, template="qwen_chat")
    torch.manual_seed(seed + 1)
    add_special_tokens(model, tokenizer)
    load_sam2_checkpoint(model, sam2_path)
    for module in model.text_hidden_fcs:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    state = {hf_key_to_sa2va(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    _save_atomically(state, path)
    return path


def _save_atomically(obj, path: str) -> None:
    """torch.save through a temp file and a rename: a kill never leaves a truncated checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def make_tiny_pretrained(
    out_dir: str, arch: str = "qwen2", image_size: int = 112, seed: int = 0,
    with_sam2: bool = True, with_sa2va_pth: bool = True, sam2_hidden_dim: Optional[int] = None,
) -> dict:
    """Write the tiny InternVL folder, SAM2 checkpoint and Sa2VA .pth under ``out_dir``; returns paths.

    ``sam2_hidden_dim``: width of the tiny SAM2 (default: the preset's); a config then needs
    ``sam2_config=dict(name='tiny', hidden_dim=...)`` with the same value.
    """
    from projects.sasasa2va.models.stand_in_pretraining import marker_path, pending_paths

    sam2_config = {"name": "tiny"} if sam2_hidden_dim is None else {"name": "tiny", "hidden_dim": int(sam2_hidden_dim)}
    # the manifest (what makes the folder count as complete) and the stand-in pretraining's marker (and a pending
    # one: both describe the old .pth) go first: a kill while the files below are rewritten leaves a folder that
    # is rebuilt, never one that looks complete
    pth = os.path.join(out_dir, SA2VA_FILE)
    stale = [os.path.join(out_dir, "tiny_manifest.json")]
    if with_sa2va_pth:
        stale += [marker_path(pth), pending_paths(pth)[1]]
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    paths = {"internvl": write_tiny_internvl(os.path.join(out_dir, INTERNVL_DIR), arch, image_size, seed)}
    if with_sam2 or with_sa2va_pth:
        paths["sam2"] = write_tiny_sam2(os.path.join(out_dir, SAM2_FILE), seed, sam2_config)
    if with_sa2va_pth:
        paths["sa2va_pth"] = write_tiny_sa2va_pth(pth, paths["internvl"], paths["sam2"], seed, sam2_config)
    atomic_write_json(os.path.join(out_dir, "tiny_manifest.json"),
                      {"arch": arch, "image_size": image_size, "seed": seed, "sam2_config": sam2_config,
                       "files": paths}, indent=2)
    return paths


def check_tiny_manifest(out_dir: str, spec: dict, command: str) -> None:
    """The tiny checkpoints in ``out_dir`` were made with the architecture settings a config asks for
    (``spec``: its ``auto_prepare.tiny_pretrained``); otherwise a clear error instead of a shape mismatch
    deep in loading. The seed is not compared (other weights, same shapes)."""
    path = os.path.join(out_dir, "tiny_manifest.json")
    with open(path, "r", encoding="utf-8") as f:
        made = json.load(f)
    want = {"arch": spec.get("arch", "qwen2"), "image_size": int(spec.get("image_size", 112)),
            "sam2_hidden_dim": spec.get("sam2_hidden_dim")}
    have = {"arch": made.get("arch"), "image_size": made.get("image_size"),
            "sam2_hidden_dim": (made.get("sam2_config") or {}).get("hidden_dim")}
    diff = [f"{k} {have[k]} (config: {want[k]})" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError(f"{path}: the tiny checkpoints in {out_dir} were made with {', '.join(diff)}; remake "
                         f"them for this config (this replaces them) with: {command}")


def tiny_cli_args(spec: dict) -> list[str]:
    """tools/make_tiny_pretrained.py options equivalent to ``make_tiny_pretrained(**spec)`` (a config's
    ``auto_prepare.tiny_pretrained`` entry; ``out_dir`` is not included)."""
    out = ["--arch", str(spec.get("arch", "qwen2")), "--image-size", str(spec.get("image_size", 112)),
           "--seed", str(spec.get("seed", 0))]
    if spec.get("sam2_hidden_dim"):
        out += ["--sam2-hidden-dim", str(spec["sam2_hidden_dim"])]
    return out


def make_tiny_for_config(out_dir: str, config_path: str) -> dict:
    """make_tiny_pretrained with a config's ``auto_prepare.tiny_pretrained`` settings (``out_dir`` aside),
    so the checkpoints match the config's image size and SAM2 width."""
    from mmengine.config import Config

    spec = dict(Config.fromfile(config_path).get("auto_prepare", {}).get("tiny_pretrained") or {})
    if not spec:
        raise ValueError(f"{config_path}: no auto_prepare.tiny_pretrained entry to take the tiny settings from")
    spec.pop("out_dir", None)
    return make_tiny_pretrained(out_dir, **spec)
