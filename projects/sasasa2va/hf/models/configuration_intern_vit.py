"""InternViT configuration (field names and defaults of the official ``intern_vit_6b`` config).

The official checkpoints store this dict as ``vision_config`` inside the InternVL ``config.json``;
keeping the same field names lets those dicts load unchanged.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """Config of the InternViT encoder (300M: layer_norm + qkv bias; 6B: rms_norm + qk norm)."""

    model_type = "intern_vit_6b"

    def __init__(
        self,
        num_channels: int = 3,
        patch_size: int = 14,
        image_size: int = 224,
        qkv_bias: bool = False,
        hidden_size: int = 3200,
        num_attention_heads: int = 25,
        intermediate_size: int = 12800,
        qk_normalization: bool = True,
        num_hidden_layers: int = 48,
        use_flash_attn: bool = False,
        hidden_act: str = "gelu",
        norm_type: str = "rms_norm",
        layer_norm_eps: float = 1e-6,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"InternVisionConfig.norm_type must be 'layer_norm' or 'rms_norm', got {norm_type!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"InternVisionConfig.hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                f"({num_attention_heads})"
            )
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.qkv_bias = qkv_bias
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.qk_normalization = qk_normalization
        self.num_hidden_layers = num_hidden_layers
        # Kept for config round trips only: attention always runs through torch SDPA here.
        self.use_flash_attn = use_flash_attn
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.layer_norm_eps = layer_norm_eps
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
