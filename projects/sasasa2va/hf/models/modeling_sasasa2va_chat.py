"""SaSaSa2VA chat model: InternVL (InternViT + pixel shuffle + mlp1 + LLM) + SAM2 grounding + [SEG] head.

This is the single model definition shared by training (the mmengine wrapper builds on it), export
(the folder is copied verbatim) and inference. Parameter names follow the official checkpoints:
``vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.*``, ``grounding_encoder.sam2_model.*``,
``text_hidden_fcs.{0,2}.*``.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaForCausalLM,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_sasasa2va_chat import SaSaSa2VAChatConfig
from .inference import DEFAULT_DECODE_ATTENTION, check_decode_attention
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM
from .sam2_grounding import SAM2Grounding
from .templates import IGNORE_INDEX

LLM_CLASSES = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
}


def build_language_model(llm_config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM named by ``llm_config.architectures[0]``."""
    arch = (llm_config.architectures or [None])[0]
    if arch not in LLM_CLASSES:
        raise ValueError(f"unsupported LLM architecture {arch!r}; expected one of {sorted(LLM_CLASSES)}")
    return LLM_CLASSES[arch](llm_config)


def build_mlp1(vit_hidden: int, llm_hidden: int, downsample_ratio: float) -> nn.Sequential:
    """Projector LN(4Cv) -> Linear(4Cv, D) -> GELU -> Linear(D, D) (indices 0, 1, 3 hold weights)."""
    in_dim = vit_hidden * int(round(1 / downsample_ratio)) ** 2
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
    )


def build_text_hidden_fcs(llm_hidden: int, out_dim: int) -> nn.Sequential:
    """[SEG] projection Linear(D, D) -> ReLU -> Linear(D, out) -> Dropout(0) (indices 0, 2 hold weights)."""
    return nn.Sequential(
        nn.Linear(llm_hidden, llm_hidden), nn.ReLU(inplace=True), nn.Linear(llm_hidden, out_dim), nn.Dropout(0.0)
    )


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """InternVL pixel shuffle on [n, w, h, c] -> [n, w*s, h*s, c/s^2].

    v2 adds the final transpose, so out[n, a, b, (di*2 + dj)*c + k] = x[n, 2a+di, 2b+dj, k] for s = 0.5.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits[:, :-1] vs labels[:, 1:], mean over targets != -100 (float32)."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def copy_cache(cache: Cache) -> DynamicCache:
    """Shallow copy of a KV cache: DynamicCache.update concatenates into new tensors, so appending
    to the copy never changes the original (cheap reuse of a shared prefix)."""
    if isinstance(cache, DynamicCache):
        return DynamicCache.from_legacy_cache(cache.to_legacy_cache())
    raise ValueError(f"only DynamicCache prefixes can be reused, got {type(cache).__name__}")


@dataclass
class PrefixCache:
    """KV cache of a prompt prefix: reuse it for several prompts that start with ``input_ids``."""

    cache: Cache
    input_ids: torch.Tensor  # [1, P]
    num_image_tokens: int  # <IMG_CONTEXT> tokens inside the prefix (vision rows already consumed)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


class GeneratedAnswer(NamedTuple):
    ids: torch.Tensor  # [n] generated token ids g_1..g_n (prompt excluded)
    text: str  # tokenizer.decode(ids, skip_special_tokens=False)
    seg_hidden_states: torch.Tensor  # [n_seg, D] last-layer states where a generated [SEG] is fed back
    prompt_cache: Optional[PrefixCache]  # cache after the prompt prefill (only if requested)


def ends_with_stop_word(text: str, stop_words: Sequence[str]) -> bool:
    """xtuner's criterion: the decoded answer with \\r and \\n removed ends with a stop word."""
    flat = text.replace("\r", "").replace("\n", "")
    return any(flat.endswith(word) for word in stop_words if word)


def eos_id_set(eos_token_id, tokenizer) -> set:
    """The EOS ids that end an answer: ``eos_token_id`` (an id or a collection), default the tokenizer's."""
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else [eos_token_id]
    return {int(e) for e in ids if e is not None}


def answer_finished(generated: Sequence[int], eos_ids: set, max_new_tokens: int, tokenizer,
                    stop_words: Sequence[str]) -> bool:
    """Greedy decoding stops after EOS, at ``max_new_tokens``, or when the answer ends with a stop word."""
    if generated[-1] in eos_ids or len(generated) >= max_new_tokens:
        return True
    return bool(stop_words) and ends_with_stop_word(tokenizer.decode(list(generated), skip_special_tokens=False),
                                                    stop_words)


class RaggedKVCache(Cache):
    """KV cache of a batch of sequences of different lengths, for batched greedy decoding.

    Row ``b`` holds its keys/values contiguously at positions ``[0, lengths[b])`` of preallocated
    buffers ``[B, heads, capacity, head_dim]`` (grown on demand); ``update`` writes a row's new states
    right after its own, so padding never sits between a row's tokens: every row sees exactly the
    keys, at exactly the positions, that it would see decoded alone. Slots past a row's length hold
    stale states and must be masked (``ragged_attention_mask``). ``advance`` moves the lengths after
    a forward pass; ``select`` drops finished rows.
    """

    def __init__(self, lengths: Sequence[int], reserve: int = 64):
        super().__init__()
        self.lengths = [int(n) for n in lengths]
        self.reserve = max(1, int(reserve))
        self.key_cache: list[torch.Tensor] = []
        self.value_cache: list[torch.Tensor] = []
        self._index = None  # (batch index [B, 1], write positions [B, q]) of the current forward pass

    @classmethod
    def from_caches(cls, caches: Sequence[Optional[Cache]], reserve: int = 64) -> "RaggedKVCache":
        """One row per cache (a DynamicCache, or None for an empty row); the states are copied."""
        return cls.from_legacy([None if c is None else c.to_legacy_cache() for c in caches], reserve)

    @classmethod
    def from_legacy(cls, legacy: Sequence, reserve: int = 64) -> "RaggedKVCache":
        """One row per legacy cache (per layer (key [1, h, n, d], value), or None); the states are copied."""
        lengths = [0 if c is None or not len(c) else int(c[0][0].shape[-2]) for c in legacy]
        out = cls(lengths, reserve)
        filled = [c for c in legacy if c is not None and len(c)]
        if not filled:
            return out
        capacity = max(lengths) + out.reserve
        for layer in range(len(filled[0])):
            for which, store in ((0, out.key_cache), (1, out.value_cache)):
                ref = filled[0][layer][which]
                buf = ref.new_zeros((len(legacy), ref.shape[1], capacity, ref.shape[3]))
                for b, c in enumerate(legacy):
                    if c is not None and lengths[b]:
                        buf[b, :, : lengths[b]] = c[layer][which][0]
                store.append(buf)
        return out

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def row_legacy(self, row: int) -> tuple:
        """Row ``row`` as a legacy cache (views of its ``lengths[row]`` states, per layer)."""
        n = self.lengths[row]
        return tuple((k[row:row + 1, :, :n], v[row:row + 1, :, :n]) for k, v in zip(self.key_cache, self.value_cache))

    def _grow(self, layer_idx: int, need: int) -> None:
        for store in (self.key_cache, self.value_cache):
            buf = store[layer_idx]
            if buf.shape[2] >= need:
                continue
            grown = buf.new_zeros((buf.shape[0], buf.shape[1], need + max(self.reserve, need // 4), buf.shape[3]))
            grown[:, :, : buf.shape[2]] = buf
            store[layer_idx] = grown

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        batch, q = key_states.shape[0], key_states.shape[-2]
        if batch != self.batch_size:
            raise ValueError(f"RaggedKVCache: batch {batch} given, {self.batch_size} rows cached")
        need = max(self.lengths) + q
        while len(self.key_cache) <= layer_idx:  # first forward pass of rows without a prefix
            self.key_cache.append(key_states.new_zeros((batch, key_states.shape[1], need + self.reserve,
                                                        key_states.shape[3])))
            self.value_cache.append(value_states.new_zeros((batch, value_states.shape[1], need + self.reserve,
                                                            value_states.shape[3])))
        self._grow(layer_idx, need)
        k_buf, v_buf = self.key_cache[layer_idx], self.value_cache[layer_idx]
        if min(self.lengths) == max(self.lengths):
            start = self.lengths[0]
            k_buf[:, :, start:start + q] = key_states
            v_buf[:, :, start:start + q] = value_states
        else:
            if self._index is None or self._index[1].shape[1] != q:
                device = key_states.device
                rows = torch.arange(batch, device=device)[:, None]
                pos = torch.as_tensor(self.lengths, device=device)[:, None] + torch.arange(q, device=device)[None]
                self._index = (rows, pos)
            rows, pos = self._index
            k_buf[rows, :, pos] = key_states.transpose(1, 2)
            v_buf[rows, :, pos] = value_states.transpose(1, 2)
        return k_buf[:, :, :need], v_buf[:, :, :need]

    def advance(self, counts) -> None:
        """The forward pass is done: row b now holds ``counts[b]`` (or ``counts``) more tokens."""
        counts = [int(counts)] * self.batch_size if isinstance(counts, int) else [int(c) for c in counts]
        self.lengths = [n + c for n, c in zip(self.lengths, counts)]
        self._index = None

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order)."""
        rows = [int(r) for r in rows]
        if rows == list(range(self.batch_size)):
            return
        if self.key_cache:
            index = torch.as_tensor(rows, device=self.key_cache[0].device)
            self.key_cache = [k.index_select(0, index) for k in self.key_cache]
            self.value_cache = [v.index_select(0, index) for v in self.value_cache]
        self.lengths = [self.lengths[r] for r in rows]
        self._index = None

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return max(self.lengths) if self.lengths else 0

    def get_max_cache_shape(self) -> Optional[int]:
        return None


def _prefix_length(input_ids: torch.Tensor, prefix_cache, caller: str) -> int:
    """Tokens of ``input_ids`` [1, n] the prefix cache covers (0 without one), after checking that the
    prompt starts with them and keeps at least one new token."""
    if prefix_cache is None:
        return 0
    start = prefix_cache.length
    if start >= input_ids.shape[1]:
        raise ValueError(f"{caller}: the prefix cache covers {start} tokens but the prompt has only "
                         f"{input_ids.shape[1]}; at least one new prompt token is needed")
    if not torch.equal(input_ids[:, :start].cpu(), prefix_cache.input_ids.cpu()):
        raise ValueError(f"{caller}: the prompt does not start with the prefix-cache tokens")
    return start


ROW_ATTENTION = "sasasa2va_rows"


def _row_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention-interface function of exact batched decoding steps (``generate_answers(exact=True)``).

    With a ``ragged_attention_mask``, SDPA runs row by row on each row's own keys (their number read
    off the mask's last query row), GQA-aware, on views of the cached states: what
    ``sdpa_attention_forward`` computes for that row alone (it expands the KV heads first; same values,
    same kernel), without copying the batch's keys. One-token steps run unmasked (as a single-prompt
    step does), longer passes with the row's causal mask (the one ``_update_causal_mask`` builds for a
    single prompt over a cache). Anything else goes to ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or attention_mask.dim() != 4 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    from .row_exact import RowExact

    lengths = (attention_mask[:, 0, -1, : key.shape[-2]] == 0).sum(-1).tolist()
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    mask = None if query.shape[2] == 1 else attention_mask
    out = RowExact.sdpa_rows(query, key, value, lengths, attn_mask=mask, scale=scaling, **gqa)
    return out.transpose(1, 2).contiguous(), None


DECODE_ATTENTION = "sasasa2va_gqa_decode"


def _gqa_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """Attention-interface function of plain batched one-token decoding steps
    (``generate_answers(exact=False, decode_attention="matmul")``).

    The query heads that share a KV head become that head's rows: two batched matmuls against the cached
    keys and values as they are (no ``repeat_kv`` copy of every row's cache, no SDPA dispatch per call),
    softmax in float32 over the additive padding mask -- the arithmetic of transformers' eager attention.
    Passes of more than one token, or with dropout, go to ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout or query.shape[1] % key.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h reads KV head h // (heads / kv_heads)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :length]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value).reshape(batch, heads, 1, dim)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _llm_attention(language_model, name: str, function):
    """Run the LLM's attention through ``function`` (registered as ``name``) inside the block."""
    config = language_model.config
    _attention_interface().register(name, function)
    previous, config._attn_implementation = config._attn_implementation, name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _attention_interface():
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # older transformers
        return None
    return AttentionInterface


def _exact_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from .row_exact import RowExact

    return RowExact._linear(x, module.weight, module.bias)


@contextlib.contextmanager
def _row_exact_llm(language_model):
    """Batch-invariant passes of an HF SDPA LLM (cheaper than the RowExact mode, which sees every op):
    its nn.Linear layers run one GEMM per batch row (``RowExact._linear``) and it attends with
    ``_row_attention`` (attention interface)."""
    patched = []
    with _llm_attention(language_model, ROW_ATTENTION, _row_attention):
        try:
            for m in language_model.modules():
                if isinstance(m, nn.Linear) and "forward" not in m.__dict__:
                    m.forward = functools.partial(_exact_linear_forward, m)
                    patched.append(m)
            yield
        finally:
            for m in patched:
                m.__dict__.pop("forward", None)


def ragged_attention_mask(lengths: Sequence[int], query_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [B, 1, q, max(lengths) + q] mask for a RaggedKVCache pass: query j of row b (position
    ``lengths[b] + j``) sees keys ``0 .. lengths[b] + j`` (its own tokens, causally), nothing else."""
    start = torch.as_tensor(list(lengths), device=device)
    keys = torch.arange(max(lengths) + query_len, device=device)
    visible = keys[None, None, :] <= (start[:, None] + torch.arange(query_len, device=device)[None, :])[:, :, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


class SaSaSa2VAChatModel(PreTrainedModel):
    config_class = SaSaSa2VAChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "InternVisionModel",
        "LlamaDecoderLayer",
        "InternLM2DecoderLayer",
        "Phi3DecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen3DecoderLayer",
        "SAM2Grounding",
    ]
    # what return_probs may ask of predict_forward / predict_video (the evaluation runner asks for uint8)
    probs_formats = ("float32", "uint8")

    def __init__(
        self,
        config: SaSaSa2VAChatConfig,
        vision_model: Optional[nn.Module] = None,
        language_model: Optional[nn.Module] = None,
    ):
        super().__init__(config)
        self.template = config.template
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = config.num_image_token
        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        self.language_model = (
            language_model if language_model is not None else build_language_model(config.llm_config)
        )
        # One config object for the LLM, so resizes/vocab updates are seen by both.
        config.llm_config = self.language_model.config
        vit_hidden = config.vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        self.mlp1 = build_mlp1(vit_hidden, llm_hidden, config.downsample_ratio)
        self.grounding_encoder = SAM2Grounding(config.sam2_config)
        self.text_hidden_fcs = build_text_hidden_fcs(llm_hidden, self.grounding_encoder.hidden_dim)
        self.post_init()

    # ---- token ids -------------------------------------------------------------------------
    @property
    def img_context_token_id(self) -> Optional[int]:
        return self.config.img_context_token_id

    @img_context_token_id.setter
    def img_context_token_id(self, value: Optional[int]) -> None:
        self.config.img_context_token_id = value

    @property
    def seg_token_id(self) -> Optional[int]:
        return self.config.seg_token_id

    @seg_token_id.setter
    def seg_token_id(self, value: Optional[int]) -> None:
        self.config.seg_token_id = value

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ---- vision ----------------------------------------------------------------------------
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, num_image_token, D]: ViT (CLS dropped), pixel shuffle, mlp1."""
        if self.select_layer == -1:
            vit = self.vision_model(pixel_values=pixel_values, output_hidden_states=False).last_hidden_state
        else:
            vit = self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
                self.select_layer
            ]
        vit = vit[:, 1:, :]
        side = int(round(vit.shape[1] ** 0.5))
        if side * side != vit.shape[1]:
            raise ValueError(f"extract_feature: {vit.shape[1]} patch tokens do not form a square grid")
        vit = vit.reshape(vit.shape[0], side, side, -1)
        vit = self.pixel_shuffle(vit, scale_factor=self.downsample_ratio)
        vit = vit.reshape(vit.shape[0], -1, vit.shape[-1])
        return self.mlp1(vit)

    def build_input_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
        image_flags: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Token embeddings with the <IMG_CONTEXT> rows replaced, in order, by the vision tokens.

        ``image_flags`` (one 0/1 per image) drops padding images before injection, as in training.
        """
        if pixel_values is not None and vision_embeds is not None:
            raise ValueError("build_input_embeds: pass pixel_values or vision_embeds, not both")
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vision_embeds = self.extract_feature(pixel_values)
        if vision_embeds is not None and image_flags is not None:
            vision_embeds = vision_embeds[image_flags.reshape(-1).to(vision_embeds.device) == 1]
        if self.img_context_token_id is None:
            if vision_embeds is not None:
                raise ValueError("build_input_embeds: config.img_context_token_id is not set")
            return embeds
        selected = input_ids == self.img_context_token_id
        num_slots = int(selected.sum())
        num_vision = 0 if vision_embeds is None else vision_embeds.reshape(-1, vision_embeds.shape[-1]).shape[0]
        if num_slots != num_vision:
            per_image = self.num_image_token
            raise ValueError(
                f"build_input_embeds: the prompt has {num_slots} <IMG_CONTEXT> tokens (id "
                f"{self.img_context_token_id}) but {num_vision} vision tokens were given "
                f"({'no images' if vision_embeds is None else tuple(vision_embeds.shape)}; "
                f"{per_image} tokens per image expected)"
            )
        if num_slots == 0:
            return embeds
        flat = vision_embeds.reshape(-1, embeds.shape[-1]).to(device=embeds.device, dtype=embeds.dtype)
        return embeds.masked_scatter(selected.unsqueeze(-1), flat)

    # ---- training / scoring forward --------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
        image_flags: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
    ) -> CausalLMOutputWithPast:
        """LLM forward on image-injected embeddings; ``loss`` = next-token CE ignoring -100."""
        embeds = self.build_input_embeds(input_ids, pixel_values, vision_embeds, image_flags)
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        loss = causal_lm_loss(out.logits, labels) if labels is not None else None
        return CausalLMOutputWithPast(
            loss=loss, logits=out.logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )

    def seg_embeddings(self, hidden_states_last: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``text_hidden_fcs`` on the last-layer states at the [SEG] input positions -> [n_seg, 256].

        Rows are ordered sample by sample, then by position (boolean-mask order).
        """
        if self.seg_token_id is None:
            raise ValueError("seg_embeddings: config.seg_token_id is not set (call add_special_tokens first)")
        mask = input_ids == self.seg_token_id
        return self.text_hidden_fcs(hidden_states_last[mask])

    # ---- greedy generation with a reusable KV cache ----------------------------------------
    @torch.no_grad()
    def build_prefix_cache(
        self,
        prefix_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
    ) -> PrefixCache:
        """Prefill a prompt prefix once. ``vision_embeds`` may cover more images than the prefix
        uses; only the first rows (as many as the prefix has <IMG_CONTEXT> tokens) are consumed."""
        prefix_ids = prefix_ids.reshape(1, -1)
        if vision_embeds is None and pixel_values is not None:
            vision_embeds = self.extract_feature(pixel_values)
        n_img = self._count_image_tokens(prefix_ids)
        rows = None
        if vision_embeds is not None:
            rows = vision_embeds.reshape(-1, vision_embeds.shape[-1])[:n_img]
        embeds = self.build_input_embeds(prefix_ids, vision_embeds=rows if n_img else None)
        out = self.language_model.get_decoder()(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True)
        return PrefixCache(out.past_key_values, prefix_ids.clone(), n_img)

    def _uses_row_attention(self) -> bool:
        """The LLM attends through transformers' SDPA attention interface (Qwen2/3, Llama, Phi3; not this
        repo's InternLM2), so exact batched passes can use ``_row_exact_llm``."""
        return (_attention_interface() is not None and not isinstance(self.language_model, InternLM2ForCausalLM)
                and getattr(self.config.llm_config, "_attn_implementation", None) == "sdpa")

    def _count_image_tokens(self, ids: torch.Tensor) -> int:
        if self.img_context_token_id is None:
            return 0
        return int((ids == self.img_context_token_id).sum())

    @torch.no_grad()
    def generate_answer(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        vision_embeds: Optional[torch.Tensor] = None,
        tokenizer=None,
        stop_words: Sequence[str] = (),
        max_new_tokens: int = 2048,
        prefix_cache: Optional[PrefixCache] = None,
        return_prompt_cache: bool = False,
        eos_token_id=None,
        max_seg_tokens: Optional[int] = None,
    ) -> GeneratedAnswer:
        """Greedy decoding (evaluation.md §2.2-2.3) for one prompt, written as an explicit KV-cache loop.

        Stops on EOS, when the decoded answer (\\r/\\n removed) ends with a stop word, or after
        ``max_new_tokens``. ``seg_hidden_states`` holds the last-layer state of every generated
        [SEG] when it is fed back as input; the final token is never fed back, so a trailing [SEG]
        has no state (as in the reference). ``max_seg_tokens``: also stop once that many [SEG] states
        are collected (one more token is generated, never fed back). Video inference passes
        ``num_clips``: later tokens cannot change those states (causal attention) and only the first
        ``num_clips`` are used (evaluation.md Q5), so the masks are the same; an answer that does not end
        after its 10th [SEG] (e.g. a barely trained model) no longer runs on to ``max_new_tokens``.
        ``prefix_cache`` (from ``build_prefix_cache`` or a
        previous ``return_prompt_cache=True`` call) skips re-encoding a shared prompt prefix; it is
        not modified.
        """
        if tokenizer is None:
            raise ValueError("generate_answer needs the tokenizer (stop words are checked on decoded text)")
        input_ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
        if input_ids.shape[0] != 1:
            raise ValueError(f"generate_answer handles one prompt at a time, got batch {input_ids.shape[0]}")
        if vision_embeds is None and pixel_values is not None:
            vision_embeds = self.extract_feature(pixel_values)
        rows = None if vision_embeds is None else vision_embeds.reshape(-1, vision_embeds.shape[-1])
        eos_ids = eos_id_set(eos_token_id, tokenizer)

        start, used_rows, cache = _prefix_length(input_ids, prefix_cache, "generate_answer"), 0, DynamicCache()
        if prefix_cache is not None:
            used_rows = prefix_cache.num_image_tokens
            cache = copy_cache(prefix_cache.cache)
        suffix = input_ids[:, start:]
        suffix_rows = None
        if self._count_image_tokens(suffix):
            if rows is None:
                raise ValueError("generate_answer: the prompt has <IMG_CONTEXT> tokens but no images were given")
            suffix_rows = rows[used_rows:]
        elif rows is not None and rows.shape[0] != used_rows:
            raise ValueError(
                f"generate_answer: {rows.shape[0]} vision tokens given but the prompt has "
                f"{used_rows + self._count_image_tokens(suffix)} <IMG_CONTEXT> tokens"
            )
        embeds = self.build_input_embeds(suffix, vision_embeds=suffix_rows)

        decoder = self.language_model.get_decoder()
        head = self.language_model.get_output_embeddings()
        embed_tokens = self.get_input_embeddings()
        out = decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        prompt_cache = None
        if return_prompt_cache:
            n_img = used_rows + self._count_image_tokens(suffix)
            prompt_cache = PrefixCache(copy_cache(cache), input_ids.clone(), n_img)
        logits = head(out.last_hidden_state[:, -1])

        generated: list[int] = []
        seg_states: list[torch.Tensor] = []
        while True:
            token = int(logits.float().argmax(-1)[0])
            generated.append(token)
            if answer_finished(generated, eos_ids, max_new_tokens, tokenizer, stop_words) or (
                    max_seg_tokens and len(seg_states) >= max_seg_tokens):
                break
            step = embed_tokens(torch.tensor([[token]], device=input_ids.device))
            out = decoder(inputs_embeds=step, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            hidden = out.last_hidden_state[:, -1]
            if self.seg_token_id is not None and token == self.seg_token_id:
                seg_states.append(hidden)
            logits = head(hidden)
        hidden_size = self.config.llm_config.hidden_size
        seg = torch.cat(seg_states, 0) if seg_states else embeds.new_zeros((0, hidden_size))
        ids = torch.tensor(generated, dtype=torch.long, device=input_ids.device)
        text = tokenizer.decode(generated, skip_special_tokens=False)
        return GeneratedAnswer(ids, text, seg, prompt_cache)

    @torch.no_grad()
    def generate_answers(
        self,
        input_ids_list: Sequence[torch.Tensor],
        prefix_cache=None,
        tokenizer=None,
        stop_words: Sequence[str] = (),
        max_new_tokens: int = 2048,
        eos_token_id=None,
        exact: Optional[bool] = None,
        max_seg_tokens: Optional[int] = None,
        decode_attention: str = DEFAULT_DECODE_ATTENTION,
    ) -> list:
        """Greedy decoding of several prompts in one batch: one ``GeneratedAnswer`` per prompt, with the
        ids / text / [SEG]-state semantics of ``generate_answer`` (same stop rules, the final token is
        never fed back, ``max_seg_tokens``, ``prompt_cache`` is None).

        ``prefix_cache``: one PrefixCache shared by every prompt, one per prompt (any lengths), or None.
        The prompt tokens after the prefix must not hold <IMG_CONTEXT> tokens (images go in the prefix,
        see ``build_prefix_cache``). Rows live in a :class:`RaggedKVCache` (each row's tokens contiguous
        at its own positions); a row that stops (EOS, stop word, ``max_new_tokens``) leaves the batch.

        ``exact`` (default: True on CPU) makes every row bit-for-bit what ``generate_answer`` computes
        for it alone: every batched pass runs one GEMM per row for each linear layer and attention row
        by row on each row's own keys (the GEMM / SDPA shapes of a single prompt; see
        ``row_exact.RowExact``), and prompt remainders are prefilled together only when their
        lengths are equal (else alone). ``exact=False`` prefills the remainders as one right-padded
        batch and runs plain batched steps with a padding mask: same answers up to floating-point
        rounding (the usual choice on GPUs, where batch-invariant kernels are not available anyway).
        One prompt is handed to ``generate_answer``; so are all prompts when the LLM's attention is
        neither eager nor SDPA (no 4-D padding masks).
        ``decode_attention`` (``exact=False``, SDPA LLMs using transformers' attention interface):
        "matmul" (default) -- one-token steps through ``_gqa_decode_attention`` (GQA-folded batched
        matmuls, eager attention's arithmetic) -- or "sdpa", transformers' SDPA path, which first expands
        every row's cached keys and values to all query heads (3.5-13x slower per step on an H200).
        """
        check_decode_attention(decode_attention)
        if tokenizer is None:
            raise ValueError("generate_answers needs the tokenizer (stop words are checked on decoded text)")
        prompts = [ids.reshape(1, -1) if ids.dim() == 1 else ids for ids in input_ids_list]
        for ids in prompts:
            if ids.dim() != 2 or ids.shape[0] != 1:
                raise ValueError(f"generate_answers: each prompt must be [n] or [1, n], got {tuple(ids.shape)}")
        n = len(prompts)
        if prefix_cache is None or isinstance(prefix_cache, PrefixCache):
            prefixes = [prefix_cache] * n
        else:
            prefixes = list(prefix_cache)
            if len(prefixes) != n:
                raise ValueError(f"generate_answers: {len(prefixes)} prefix caches for {n} prompts")
        common = dict(tokenizer=tokenizer, stop_words=stop_words, max_new_tokens=max_new_tokens,
                      eos_token_id=eos_token_id, max_seg_tokens=max_seg_tokens)
        if n == 0:
            return []
        impl = getattr(self.config.llm_config, "_attn_implementation", None)
        if n == 1 or impl not in (None, "eager", "sdpa"):  # padding masks need eager/SDPA attention
            return [self.generate_answer(ids, prefix_cache=p, **common) for ids, p in zip(prompts, prefixes)]
        device = prompts[0].device
        exact = device.type == "cpu" if exact is None else bool(exact)
        eos_ids = eos_id_set(eos_token_id, tokenizer)

        suffixes = []
        for ids, prefix in zip(prompts, prefixes):
            suffix = ids[:, _prefix_length(ids, prefix, "generate_answers"):]
            if self._count_image_tokens(suffix):
                raise ValueError("generate_answers: <IMG_CONTEXT> tokens after the prefix cache; put the images "
                                 "in the prefix (build_prefix_cache)")
            suffixes.append(suffix)

        from .row_exact import RowExact

        decoder = self.language_model.get_decoder()
        head = self.language_model.get_output_embeddings()
        embed_tokens = self.get_input_embeddings()
        sizes = [int(x.shape[1]) for x in suffixes]
        # exact passes: HF SDPA LLMs patch their linears and attention (cheap); others (InternLM2, which
        # calls SDPA itself) run under the RowExact torch-function mode
        light = exact and self._uses_row_attention()

        def exact_pass(key_lengths=None):
            if not exact:
                return contextlib.nullcontext()
            return _row_exact_llm(self.language_model) if light else RowExact(key_lengths=key_lengths)

        def step_pass(key_lengths):
            if not exact and decode_attention == "matmul" and self._uses_row_attention():
                return _llm_attention(self.language_model, DECODE_ATTENTION, _gqa_decode_attention)
            return exact_pass(key_lengths=key_lengths)

        reserve = max(64, min(int(max_new_tokens), 256))
        if exact:  # every row's prompt prefilled as generate_answer does it alone
            rows, last = [None] * n, [None] * n
            groups: dict = {}
            for b, (size, prefix) in enumerate(zip(sizes, prefixes)):
                # rows with a prefix and equal suffix lengths share a pass: the same GEMM / SDPA shapes per row
                key = ("group", size) if light and prefix is not None else ("alone", b)
                groups.setdefault(key, []).append(b)
            for members in groups.values():
                if len(members) == 1:
                    b = members[0]
                    cache = DynamicCache() if prefixes[b] is None else copy_cache(prefixes[b].cache)
                    out = decoder(inputs_embeds=self.build_input_embeds(suffixes[b]), past_key_values=cache,
                                  use_cache=True)
                    rows[b], last[b] = out.past_key_values.to_legacy_cache(), out.last_hidden_state[:, -1]
                    continue
                part = RaggedKVCache.from_caches([prefixes[b].cache for b in members], reserve=sizes[members[0]])
                width = sizes[members[0]]
                embeds = torch.cat([self.build_input_embeds(suffixes[b]) for b in members])
                positions = torch.as_tensor(part.lengths, device=device)[:, None] + torch.arange(width, device=device)
                mask = ragged_attention_mask(part.lengths, width, embeds.dtype, device)
                with exact_pass():
                    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  past_key_values=part, use_cache=True)
                part.advance(width)
                for i, b in enumerate(members):
                    rows[b], last[b] = part.row_legacy(i), out.last_hidden_state[i:i + 1, -1]
                del part
            kv = RaggedKVCache.from_legacy(rows, reserve=reserve)
            del rows
            hidden = torch.cat(last)
            with exact_pass():
                logits = head(hidden)  # one head call for the batch
        else:  # one right-padded batch over the prefixes
            kv = RaggedKVCache.from_caches([None if p is None else p.cache for p in prefixes],
                                           reserve=max(sizes) + reserve)
            embeds = [self.build_input_embeds(x)[0] for x in suffixes]
            width = max(sizes)
            batch = embeds[0].new_zeros((n, width, embeds[0].shape[-1]))
            for b, e in enumerate(embeds):
                batch[b, : e.shape[0]] = e
            starts = torch.as_tensor(kv.lengths, device=device)
            positions = starts[:, None] + torch.arange(width, device=device)[None]
            mask = ragged_attention_mask(kv.lengths, width, batch.dtype, device)
            out = decoder(inputs_embeds=batch, attention_mask=mask, position_ids=positions, past_key_values=kv,
                          use_cache=True)
            kv.advance(sizes)
            last_index = torch.as_tensor([s - 1 for s in sizes], device=device)
            hidden = out.last_hidden_state[torch.arange(n, device=device), last_index]
            logits = head(hidden)

        generated: list[list[int]] = [[] for _ in range(n)]
        seg_states: list[list[torch.Tensor]] = [[] for _ in range(n)]
        active = list(range(n))
        seg_id = self.seg_token_id
        while True:
            tokens = logits.float().argmax(-1).tolist()
            keep = []
            for i, b in enumerate(active):
                generated[b].append(int(tokens[i]))
                if not (answer_finished(generated[b], eos_ids, max_new_tokens, tokenizer, stop_words) or (
                        max_seg_tokens and len(seg_states[b]) >= max_seg_tokens)):
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                kv.select(keep)
                active = [active[i] for i in keep]
            step = embed_tokens(torch.tensor([[generated[b][-1]] for b in active], device=device))
            positions = torch.as_tensor(kv.lengths, device=device)[:, None]
            mask = ragged_attention_mask(kv.lengths, 1, step.dtype, device)
            with step_pass([length + 1 for length in kv.lengths]):
                out = decoder(inputs_embeds=step, attention_mask=mask, position_ids=positions, past_key_values=kv,
                              use_cache=True)
                hidden = out.last_hidden_state[:, -1]
                for i, b in enumerate(active):
                    if seg_id is not None and generated[b][-1] == seg_id:
                        seg_states[b].append(hidden[i:i + 1])
                logits = head(hidden)
            kv.advance(1)
        del kv
        hidden_size = self.config.llm_config.hidden_size
        answers = []
        for b in range(n):
            seg = torch.cat(seg_states[b], 0) if seg_states[b] else hidden.new_zeros((0, hidden_size))
            ids = torch.tensor(generated[b], dtype=torch.long, device=prompts[b].device)
            answers.append(GeneratedAnswer(ids, tokenizer.decode(generated[b], skip_special_tokens=False), seg, None))
        return answers

    # =========================================================================================
    # predict_forward (five inference modes) -- RESERVED: added by a later task in this file.
    # =========================================================================================
    @torch.no_grad()
    def predict_forward(
        self,
        image=None,
        video=None,
        text: Optional[str] = None,
        tokenizer=None,
        mode: str = "uniform",
        selected_fids: Optional[Sequence[int]] = None,
        past_text: str = "",
        mask_prompts=None,
        print_answer: bool = False,
        return_probs=False,
        samurai: bool = False,
        **options,
    ) -> dict:
        """One expression on a video (five modes, evaluation.md §1-2) or an image (one mask per [SEG]).

        Returns ``{"prediction": answer text, "prediction_masks": [bool [T,H,W]] (video; image: one
        [1,H,W] per [SEG]), "probabilities": like the masks, float32 sigmoid (return_probs True or
        "float32") or uint8 round(255 p) computed on the device (return_probs "uint8"),
        "num_seg": int, "status": "ok" | "no_seg"}``. A video answer without [SEG] gives all-empty
        masks and status "no_seg". ``text`` must hold '<image>' (templates.eval_prompt does).
        q_frame needs ``selected_fids`` (the 100 indices of selected_frames.json).
        Options (faithful defaults): q_frame_anchor_fix=False, uncovered_fix=False,
        path_b_average='logits'|'probs', propagation='memory'|'none'|'memory_original_sam2' (with
        sam2_original_checkpoint), max_new_tokens=2048, naive=False (no caching at all),
        feature_budget_bytes=None. ``samurai`` (the reference's SAMURAI switch) is accepted as False only.
        Runs on the device and dtype of the model's parameters, in eval mode for the call.
        """
        from .video_context import predict_forward as _predict_forward

        if samurai:
            raise NotImplementedError("predict_forward(samurai=True): SAMURAI tracking is not implemented "
                                      "(SaSaSa2VA's modes do not use it)")
        return _predict_forward(
            self, image=image, video=video, text=text, tokenizer=tokenizer, mode=mode,
            selected_fids=selected_fids, past_text=past_text, mask_prompts=mask_prompts,
            print_answer=print_answer, return_probs=return_probs, **options,
        )

    @torch.no_grad()
    def predict_video(
        self,
        frames,
        texts: Sequence[str],
        tokenizer,
        modes: Sequence[str],
        selected_fids=None,
        return_probs=True,
        context=None,
        **options,
    ) -> dict:
        """Every (text, mode) of one video through one shared VideoContext -> ``{mode: [result per text]}``.

        Results equal a fresh ``predict_forward`` per (text, mode) bit for bit (on CPU float32), but
        frames are SAM2-encoded once, MLLM images encoded once, prompt prefixes, answers and decode
        results are reused, and the video's distinct answers are greedy-decoded in batches
        (``generate_answers``). (text, mode) pairs whose outputs coincide (same answer and decode plan,
        e.g. wrap_around and wrap_around_plus below 100 frames) share the same read-only arrays: copy
        before writing into them. ``selected_fids`` (q_frame): dict keyed by text index (or text) or a list of
        lists. Extra keywords: ``on_result(mode, text_index, result)`` callback, ``keep_results``
        (False: only the callback sees results), ``errors='raise'|'record'`` (record: a failing item
        gets status "failed" and "error"), plus the predict_forward options. Pass ``context`` (a
        VideoContext from ``video_context``) to read its work counters or reuse it across calls.
        """
        from .video_context import predict_video as _predict_video

        return _predict_video(self, frames, texts, tokenizer, modes, selected_fids=selected_fids,
                              return_probs=return_probs, context=context, **options)

    def video_context(self, tokenizer, frames, feature_budget_bytes: Optional[int] = None, **kwargs):
        """A VideoContext (shared per-video caches + work counters) for ``predict_video(context=...)``."""
        from .video_context import VideoContext

        return VideoContext(self, tokenizer, frames, feature_budget_bytes, **kwargs)

    @staticmethod
    def _remote_code_modules() -> tuple:
        """Every sibling module, imported by this file.

        ``from_pretrained(local_folder, trust_remote_code=True)`` copies into transformers' module
        cache only the modules that the model file itself imports relatively (it does not follow
        imports of imports for local folders), so each sibling must be named here for an export folder
        to load (tests/test_export.py checks that none is missing).
        """
        from .configuration_intern_vit import InternVisionConfig
        from .configuration_internlm2 import InternLM2Config
        from .frame_sampling import decode_plan
        from .inference import InferenceOptions
        from .preprocessing import kfc_mllm_images
        from .video_context import VideoContext

        return InternVisionConfig, InternLM2Config, decode_plan, InferenceOptions, kfc_mllm_images, VideoContext
