"""SaSaSa2VA chat-model configuration: InternVL fields + SAM2 grounding + KFC video settings.

The LLM config class is chosen by ``llm_config['architectures'][0]`` like the official InternVL
config; the nested dicts are serialised in full so a saved ``config.json`` reloads without this
class's defaults.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional

from transformers import LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config, Qwen3Config

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config

LLM_CONFIG_CLASSES = {
    "Qwen2ForCausalLM": Qwen2Config,
    "Qwen3ForCausalLM": Qwen3Config,
    "Phi3ForCausalLM": Phi3Config,
    "LlamaForCausalLM": LlamaConfig,
    "InternLM2ForCausalLM": InternLM2Config,
}

# Top-level fields copied from an official InternVL config.json (checkpoints.md §1a).
INTERNVL_FIELDS = (
    "template",
    "downsample_ratio",
    "force_image_size",
    "select_layer",
    "ps_version",
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "use_backbone_lora",
    "use_llm_lora",
    "pad2square",
)


def build_llm_config(llm_config: Any) -> PretrainedConfig:
    """Dict (or config) -> the config class named by ``architectures[0]``."""
    if isinstance(llm_config, PretrainedConfig):
        return llm_config
    llm_config = dict(llm_config or {})
    archs = llm_config.get("architectures") or ["Qwen2ForCausalLM"]
    arch = archs[0]
    if arch not in LLM_CONFIG_CLASSES:
        raise ValueError(
            f"llm_config.architectures[0] = {arch!r} is not supported; expected one of {sorted(LLM_CONFIG_CLASSES)}"
        )
    llm_config["architectures"] = [arch] + list(archs[1:])
    llm_config.pop("model_type", None)  # fixed by the class
    if arch != "InternLM2ForCausalLM":
        # Official InternVL llm_configs may request flash_attention_2, which would make transformers
        # refuse to build the LLM where flash-attn is absent (CPU). Default (SDPA) is used instead;
        # set ``language_model.config._attn_implementation`` explicitly to change it.
        llm_config.pop("attn_implementation", None)
        llm_config.pop("_attn_implementation", None)
    return LLM_CONFIG_CLASSES[arch](**llm_config)


def _build_vision_config(vision_config: Any) -> InternVisionConfig:
    if isinstance(vision_config, InternVisionConfig):
        return vision_config
    vision_config = dict(vision_config or {})
    vision_config.pop("model_type", None)
    return InternVisionConfig(**vision_config)


class SaSaSa2VAChatConfig(PretrainedConfig):
    """Config of ``SaSaSa2VAChatModel``; ``sam2_config`` is a plain dict owned by the grounding module."""

    model_type = "sasasa2va_chat"

    def __init__(
        self,
        vision_config: Optional[dict] = None,
        llm_config: Optional[dict] = None,
        sam2_config: Optional[dict] = None,
        template: str = "phi3_chat",
        downsample_ratio: float = 0.5,
        force_image_size: Optional[int] = 448,
        select_layer: int = -1,
        ps_version: str = "v2",
        dynamic_image_size: bool = False,
        use_thumbnail: bool = False,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        num_clips: int = 10,
        grid_size: int = 3,
        num_sampled_frames: int = 100,
        sam2_image_size: int = 1024,
        seg_token_id: Optional[int] = None,
        img_context_token_id: Optional[int] = None,
        use_backbone_lora: int = 0,
        use_llm_lora: int = 0,
        pad2square: bool = False,
        **kwargs,
    ):
        kwargs["tie_word_embeddings"] = False  # the chat model never ties at top level
        super().__init__(**kwargs)
        self.vision_config = _build_vision_config(vision_config)
        self.llm_config = build_llm_config(llm_config)
        self.sam2_config = copy.deepcopy(sam2_config) if sam2_config is not None else {"name": "sam2_hiera_l"}
        if ps_version not in ("v1", "v2"):
            raise ValueError(f"SaSaSa2VAChatConfig.ps_version must be 'v1' or 'v2', got {ps_version!r}")
        self.template = template
        self.downsample_ratio = downsample_ratio
        self.force_image_size = force_image_size
        self.select_layer = select_layer
        self.ps_version = ps_version
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.num_clips = num_clips
        self.grid_size = grid_size
        self.num_sampled_frames = num_sampled_frames
        self.sam2_image_size = sam2_image_size
        self.seg_token_id = seg_token_id
        self.img_context_token_id = img_context_token_id
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.hidden_size = self.llm_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision_config.image_size

    @property
    def num_image_token(self) -> int:
        """Tokens per image after pixel shuffle: (size / patch)^2 * ratio^2 (256 for 448 px)."""
        side = self.image_size // self.vision_config.patch_size
        return int(side * side * self.downsample_ratio**2)

    @property
    def llm_architecture(self) -> str:
        return self.llm_config.architectures[0]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        for sub in (out["vision_config"], out["llm_config"]):
            sub.pop("transformers_version", None)
        return out

    def to_diff_dict(self) -> dict:
        """Nested configs in full (their class depends on ``architectures``); generic
        PretrainedConfig fields only where they differ from the base defaults."""
        full = self.to_dict()
        base = PretrainedConfig().to_dict()
        out = {
            k: v
            for k, v in full.items()
            if k not in base or k in ("transformers_version", "architectures", "tie_word_embeddings") or v != base[k]
        }
        out.pop("_name_or_path", None)
        return out

    @classmethod
    def from_internvl_config(cls, path_or_dict: Any, **overrides) -> "SaSaSa2VAChatConfig":
        """Read an official InternVL ``config.json`` (folder, file or dict; model_type internvl_chat)."""
        source = path_or_dict
        if isinstance(path_or_dict, (str, os.PathLike)):
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"InternVL config not found: {path}")
            with open(path, encoding="utf-8") as f:
                source = json.load(f)
        if not isinstance(source, dict):
            raise ValueError(f"from_internvl_config expects a path or a dict, got {type(path_or_dict).__name__}")
        if source.get("model_type") != "internvl_chat":
            raise ValueError(
                f"{path_or_dict if not isinstance(path_or_dict, dict) else 'config dict'}: model_type is "
                f"{source.get('model_type')!r}, expected 'internvl_chat'"
            )
        for key in ("vision_config", "llm_config"):
            if key not in source:
                raise ValueError(f"InternVL config lacks the key {key!r}")
        fields = {k: source[k] for k in INTERNVL_FIELDS if k in source}
        fields["vision_config"] = copy.deepcopy(source["vision_config"])
        fields["llm_config"] = copy.deepcopy(source["llm_config"])
        fields.update(overrides)
        return cls(**fields)
