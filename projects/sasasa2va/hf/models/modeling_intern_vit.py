"""InternViT encoder with the parameter names of the official InternVL checkpoints.

Module tree (checkpoints.md §2): ``embeddings.{class_embedding, patch_embedding, position_embedding}``,
``encoder.layers.N.{attn.qkv, attn.q_norm, attn.k_norm, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2,
ls1, ls2}``. There is no final norm: the chat model reads ``last_hidden_state`` directly.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm computed in float32 (the 6B ViT's norm and its q/k norms)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def build_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return InternRMSNorm(hidden_size, eps=eps)
    return nn.LayerNorm(hidden_size, eps=eps)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class InternVisionEmbeddings(nn.Module):
    """CLS token + stride-p patch conv + learned positions (resized bicubically for other sizes)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _patch_positions(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        side = self.image_size // self.patch_size
        pos = self.position_embedding[:, 1:]
        if (height, width) == (side, side):
            return pos.to(dtype)
        # Same recipe as the official model: resize in float32 on a (side x side) grid.
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(target_dtype))  # [B, C, h, w]
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(target_dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        position = torch.cat(
            [self.position_embedding[:, :1].to(target_dtype), self._patch_positions(height, width, target_dtype)],
            dim=1,
        )
        return embeddings + position


class InternAttention(nn.Module):
    """Fused-qkv multi-head self-attention; optional RMS q/k norm over the full width (6B ViT)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.attention_dropout = config.attention_dropout
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, channels = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
        if self.qk_normalization:
            q = self.q_norm(q.transpose(1, 2).flatten(2)).view(batch, length, self.num_heads, -1).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(2)).view(batch, length, self.num_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, length, channels)
        return self.proj_drop(self.proj(out))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with layer scale: x += ls1*attn(norm1(x)); x += ls2*mlp(norm2(x))."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = build_norm(config.norm_type, self.embed_dim, config.layer_norm_eps)
        self.norm2 = build_norm(config.norm_type, self.embed_dim, config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path1 = DropPath(drop_path_rate)
        self.drop_path2 = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states).to(dtype)) * self.ls1)
        hidden_states = hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states).to(dtype)) * self.ls2)
        return hidden_states


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers  # plain floats (= linspace), so the model also builds on the meta device
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList(
            [InternVisionEncoderLayer(config, rates[i]) for i in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        all_states = () if output_hidden_states else None
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                all_states = all_states + (hidden_states,)
            if self.gradient_checkpointing and self.training:
                hidden_states = torch.utils.checkpoint.checkpoint(layer, hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states)
        if output_hidden_states:
            all_states = all_states + (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_states)


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, InternRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, InternVisionEmbeddings):
            nn.init.normal_(module.class_embedding, mean=0.0, std=std)
            nn.init.normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            nn.init.constant_(module.ls1, self.config.initializer_factor)
            nn.init.constant_(module.ls2, self.config.initializer_factor)


class InternVisionModel(InternVisionPreTrainedModel):
    """InternViT: embeddings + encoder. ``pooler_output`` is the CLS row of the last layer."""

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> InternVisionEmbeddings:
        return self.embeddings

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        pixel_embeds: Optional[torch.Tensor] = None,
    ) -> Union[Tuple, BaseModelOutputWithPooling]:
        if (pixel_values is None) == (pixel_embeds is None):
            raise ValueError("InternVisionModel: pass exactly one of pixel_values or pixel_embeds")
        return_dict = True if return_dict is None else return_dict
        hidden = pixel_embeds if pixel_embeds is not None else self.embeddings(pixel_values)
        enc = self.encoder(hidden, output_hidden_states=bool(output_hidden_states))
        last = enc.last_hidden_state
        out = BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=last[:, 0, :], hidden_states=enc.hidden_states
        )
        return out if return_dict else out.to_tuple()
