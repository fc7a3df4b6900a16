"""InternLM2 configuration (field names of the official ``internlm2`` config.json).

transformers ships no InternLM2, and the official one is remote code; this re-derivation keeps the
same fields so an InternVL ``llm_config`` dict with ``architectures: ['InternLM2ForCausalLM']`` loads.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    """InternLM2 decoder config. ``bias`` toggles the bias of wqkv/wo (false in the released models)."""

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 103168,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        bias: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attn_implementation: str | None = "eager",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        # Stored for round trips of official configs only (they request flash attention); this
        # implementation always uses torch SDPA, so it is deliberately not passed to the base class.
        self.attn_implementation = attn_implementation
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"InternLM2Config.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"InternLM2Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            factor = self.rope_scaling.get("factor")
            if kind not in ("linear", "dynamic") or not isinstance(factor, (int, float)) or factor < 1.0:
                raise ValueError(
                    "InternLM2Config.rope_scaling must be {'type': 'linear'|'dynamic', 'factor': float >= 1}, "
                    f"got {self.rope_scaling!r}"
                )
