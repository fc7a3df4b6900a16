"""SAM2 grounding encoder: encode frames once, decode them with a [SEG] prompt, propagate with memory.

The SAM2 modules come from the installed ``sam2`` package (v1 hiera-L config); this file is only the
glue that Sa2VA/SaSaSa2VA adds around them (spec model_training_reference.md §1.8, evaluation.md §1.4):

* the language embedding (the projected [SEG] hidden state, ``hidden_dim`` wide) is appended as one more
  sparse token after SAM's empty point prompt (dummy point with label -1 + padding point);
* frames are decoded as *initial conditioning frames*: features + ``no_mem_embed`` (directly-add path,
  no memory attention), dense prompt = ``no_mask_embed``, 3-mask output, best predicted IoU;
* ``mode='train'`` keeps every mask (no NO_OBJ veto) and float32 logits; ``mode='infer'`` applies SAM2's
  inference behaviour (object-score logit <= 0 -> whole mask = -1024);
* Path C: conditioning frames are decoded as in ``infer`` and memory-encoded, the other frames are
  tracked with ``SAM2Base.track_step`` exactly as ``SAM2VideoPredictor.propagate_in_video`` does;
  Sa2VA-i's variant enters the decoded masks into the original SAM2 weights and tracks with those.

Exported verbatim into every HF folder: imports only torch, sam2, hydra/omegaconf and siblings.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import sam2
from sam2.modeling.memory_encoder import CXBlock
from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_YAML_FILES = {"sam2_hiera_l": "configs/sam2/sam2_hiera_l.yaml"}
PRESETS = ("sam2_hiera_l", "tiny")

# What sam2.build_sam.build_sam2_video_predictor(apply_postprocessing=True) adds for inference, minus
# fill_hole_area (a SAM2VideoPredictor argument, and a no-op without the CUDA extension). No parameters.
INFERENCE_POSTPROCESSING = {
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
    "binarize_mask_from_pts_for_mem_enc": True,
}

# Tiny trunk: stages of 1/1/2/1 blocks (dims 8/16/32/64); block 3 (stage 3, after its q-pool block,
# which cannot be global) attends globally like hiera-L's stage-3 global blocks. Cheap on CPU.
_TINY_TRUNK = {
    "embed_dim": 8,
    "num_heads": 1,
    "stages": [1, 1, 2, 1],
    "global_att_blocks": [3],
    "window_pos_embed_bkg_spatial_size": [4, 4],
    "window_spec": [8, 4, 8, 8],
}
_TINY_DEFAULTS = {"image_size": 256, "hidden_dim": 64, "mem_dim": 16}
# The tiny model starts from random weights, and the reference trains neither the IoU head nor the
# object-score head (they get no gradient). With a random IoU head, multimask selection picks an
# arbitrary mask token per sample (splitting the training signal across three tokens), and a random
# object-score head would veto arbitrary frames at inference. So the tiny preset uses the single-mask
# output and no object-score head; hiera-L keeps the reference behaviour (its heads are pretrained).
_TINY_FLAGS = {
    "multimask_output_in_sam": False,
    "multimask_output_for_tracking": False,
    "use_multimask_token_for_obj_ptr": False,
    "pred_obj_scores": False,
    "pred_obj_scores_mlp": False,
    "fixed_no_obj_ptr": False,
    "sam_mask_decoder_extra_args": {"dynamic_multimask_via_stability": False},
}
_SHORTCUTS = ("image_size", "hidden_dim", "mem_dim", "postprocessing", "reference_heads")

PromptMap = Mapping[int, torch.Tensor]


# ----------------------------------------------------------------------------------------- configs
def _yaml_model_node(name: str) -> dict:
    """The 'model' node of the sam2 package's yaml, as a plain dict (read at call time, never copied)."""
    from omegaconf import OmegaConf

    path = os.path.join(os.path.dirname(sam2.__file__), _YAML_FILES[name])
    return OmegaConf.to_container(OmegaConf.load(path).model, resolve=True)


def _set_dotted(cfg: dict, key: str, value) -> None:
    """Hydra-style '++a.b.c=v' on a plain dict (missing levels are created)."""
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _set_image_size(cfg: dict, size: int) -> None:
    """Image size plus the RoPE grid of the memory attention (stride 16), so both stay consistent."""
    if size % 32:
        raise ValueError(f"sam2 config: image_size must be a multiple of 32 (Hiera strides), got {size}")
    cfg["image_size"] = size
    layer = cfg["memory_attention"]["layer"]
    for att in ("self_attention", "cross_attention"):
        layer[att]["feat_sizes"] = [size // 16, size // 16]


def _set_hidden_dim(cfg: dict, dim: int) -> None:
    """Every place the SAM2 hidden width (neck d_model = prompt/decoder/memory-attention width) appears."""
    if dim % 8:
        raise ValueError(f"sam2 config: hidden_dim must be a multiple of 8 (8 decoder heads), got {dim}")
    neck = cfg["image_encoder"]["neck"]
    neck["d_model"] = dim
    neck["position_encoding"]["num_pos_feats"] = dim
    att = cfg["memory_attention"]
    att["d_model"] = att["layer"]["d_model"] = dim
    att["layer"]["self_attention"]["embedding_dim"] = dim
    att["layer"]["cross_attention"]["embedding_dim"] = dim
    enc = cfg["memory_encoder"]
    enc["in_dim"] = dim
    enc["mask_downsampler"]["embed_dim"] = dim
    enc["fuser"]["layer"]["dim"] = dim


def _set_mem_dim(cfg: dict, dim: int) -> None:
    """Memory width (memory encoder output, its pos enc, memory-attention keys)."""
    enc = cfg["memory_encoder"]
    enc["out_dim"] = dim
    enc["position_encoding"]["num_pos_feats"] = dim
    cfg["memory_attention"]["layer"]["cross_attention"]["kv_in_dim"] = dim


def _tiny_node() -> dict:
    """hiera-L structure with a tiny trunk, a matching neck and small memory modules."""
    cfg = _yaml_model_node("sam2_hiera_l")
    trunk = cfg["image_encoder"]["trunk"]
    trunk.update(_TINY_TRUNK)
    dims = [_TINY_TRUNK["embed_dim"] * 2**i for i in range(len(_TINY_TRUNK["stages"]))]
    cfg["image_encoder"]["neck"]["backbone_channel_list"] = dims[::-1]
    cfg["memory_attention"]["num_layers"] = 2
    cfg["memory_attention"]["layer"]["dim_feedforward"] = 128
    _set_image_size(cfg, _TINY_DEFAULTS["image_size"])
    _set_hidden_dim(cfg, _TINY_DEFAULTS["hidden_dim"])
    _set_mem_dim(cfg, _TINY_DEFAULTS["mem_dim"])
    return cfg


def sam2_config_preset(name: str, overrides: Mapping | None = None) -> dict:
    """Full SAM2 model config dict (JSON-serialisable, hydra ``_target_`` nodes) for a named preset.

    ``name``: 'sam2_hiera_l' (SAM2 v1 hiera-L, read from the installed package's yaml) or 'tiny'.
    ``overrides``: shortcut keys ``image_size``, ``hidden_dim``, ``mem_dim`` (kept consistent across
    modules), ``postprocessing`` (bool, default True: the parameter-free inference flags SAM2 adds when
    building a predictor, see INFERENCE_POSTPROCESSING), and any dotted key into the model node
    (e.g. ``{'memory_attention.num_layers': 1}``), applied last.
    """
    if name not in PRESETS:
        raise ValueError(f"sam2 config: unknown preset name {name!r}; expected one of {PRESETS}")
    overrides = dict(overrides or {})
    cfg = _tiny_node() if name == "tiny" else _yaml_model_node(name)
    if overrides.pop("postprocessing", True):
        for key, value in INFERENCE_POSTPROCESSING.items():
            cfg[key] = dict(value) if isinstance(value, dict) else value
    reference_heads = bool(overrides.pop("reference_heads", False))
    if name == "tiny" and not reference_heads:
        for key, value in _TINY_FLAGS.items():
            cfg[key] = dict(value) if isinstance(value, dict) else value
    if "image_size" in overrides:
        _set_image_size(cfg, int(overrides.pop("image_size")))
    if "hidden_dim" in overrides:
        _set_hidden_dim(cfg, int(overrides.pop("hidden_dim")))
    if "mem_dim" in overrides:
        _set_mem_dim(cfg, int(overrides.pop("mem_dim")))
    for key, value in overrides.items():
        _set_dotted(cfg, key, value)
    return cfg


def resolve_sam2_config(sam2_config: Union[str, Mapping, None]) -> dict:
    """Accept a preset name, ``{'name': preset, **overrides}`` or a full model dict (has ``_target_``)."""
    if sam2_config is None:
        return sam2_config_preset("sam2_hiera_l")
    if isinstance(sam2_config, str):
        return sam2_config_preset(sam2_config)
    if not isinstance(sam2_config, Mapping):
        raise ValueError(f"sam2_config: expected a preset name or a dict, got {type(sam2_config).__name__}")
    if "_target_" in sam2_config:
        return dict(sam2_config)
    if "name" not in sam2_config:
        raise ValueError("sam2_config: dict needs either '_target_' (full model config) or 'name' (preset)")
    rest = {k: v for k, v in sam2_config.items() if k != "name"}
    return sam2_config_preset(sam2_config["name"], rest)


# ------------------------------------------------------------------------------ layer-scale naming
class CXBlockGWeight(CXBlock):
    """CXBlock whose layer scale is the parameter ``g_weight`` (the name in the official HF exports).

    A rename *hook* is not enough: transformers' ``from_pretrained`` matches checkpoint keys to
    ``model.state_dict()`` names and then looks them up as real parameters. ``forward`` (from sam2)
    reads ``self.gamma``, which this property maps to ``g_weight``.
    """

    @property
    def gamma(self):
        return self._parameters["g_weight"]


def _accept_gamma_key(module, state_dict, prefix, *args) -> None:
    """Load pre-hook: official SAM2 / Sa2VA .pth files name the layer scale '.gamma'."""
    old, new = prefix + "gamma", prefix + "g_weight"
    if old in state_dict and new not in state_dict:
        state_dict[new] = state_dict.pop(old)


def use_g_weight_names(model: nn.Module) -> nn.Module:
    """Re-register every CXBlock layer scale as ``g_weight``; loading still accepts ``gamma``."""
    for module in model.modules():
        if type(module) is CXBlock and isinstance(module._parameters.get("gamma"), nn.Parameter):
            param = module._parameters.pop("gamma")
            module.__class__ = CXBlockGWeight
            module.register_parameter("g_weight", param)
            module.register_load_state_dict_pre_hook(_accept_gamma_key)
    return model


def official_sam2_state_dict(sam2_model: nn.Module) -> dict:
    """State dict in the facebookresearch checkpoint layout ('.gamma'), for ``{'model': sd}`` files."""
    return {(k[: -len("g_weight")] + "gamma" if k.endswith(".g_weight") else k): v
            for k, v in sam2_model.state_dict().items()}


def build_sam2_model(cfg: Mapping) -> SAM2Base:
    """Instantiate SAM2Base from a config dict via hydra (no global hydra initialisation needed)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = instantiate(OmegaConf.create(dict(cfg)), _recursive_=True)
    return use_g_weight_names(model)


# ---------------------------------------------------------------------------------------- features
def _index(t: torch.Tensor, idx) -> torch.Tensor:
    if isinstance(idx, int):
        return t[idx : idx + 1] if idx != -1 else t[-1:]
    if isinstance(idx, slice):
        return t[idx]
    return t.index_select(0, torch.as_tensor(idx, dtype=torch.long, device=t.device))


@dataclass
class FrameFeatures:
    """Per-frame SAM2 backbone outputs, computed once and indexed by every decode that needs them.

    high_res: (stride-4 level after conv_s0 [N,C/8,4h,4w], stride-8 level after conv_s1 [N,C/4,2h,2w]);
    low: stride-16 level [N,C,h,w] *without* no_mem_embed (added at decode; memory attention needs
    the raw map); pos: sine pos enc of the low level [1,C,h,w] (frame independent, kept once).
    """

    high_res: tuple
    low: torch.Tensor
    pos: torch.Tensor

    def __len__(self) -> int:
        return self.low.shape[0]

    def __getitem__(self, idx) -> "FrameFeatures":
        """int -> 1-frame features (batch dim kept); slice / list / LongTensor -> gathered frames."""
        return FrameFeatures(tuple(_index(t, idx) for t in self.high_res), _index(self.low, idx), self.pos)

    def to(self, *args, **kwargs) -> "FrameFeatures":
        return FrameFeatures(tuple(t.to(*args, **kwargs) for t in self.high_res),
                             self.low.to(*args, **kwargs), self.pos.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence["FrameFeatures"]) -> "FrameFeatures":
        if not items:
            raise ValueError("FrameFeatures.cat: empty list")
        high = tuple(torch.cat([it.high_res[i] for it in items]) for i in range(len(items[0].high_res)))
        return FrameFeatures(high, torch.cat([it.low for it in items]), items[0].pos)

    @property
    def nbytes(self) -> int:
        """Memory held by these features (lets callers bound a feature cache)."""
        return sum(t.numel() * t.element_size() for t in (*self.high_res, self.low, self.pos))

    @property
    def feat_sizes(self) -> list:
        return [tuple(t.shape[-2:]) for t in (*self.high_res, self.low)]

    def flat(self):
        """SAM2's internal layout: lists of [HW,B,C] maps (pos only for the low level, the only one used)."""
        feats = [t.flatten(2).permute(2, 0, 1) for t in (*self.high_res, self.low)]
        pos = self.pos.expand(len(self), -1, -1, -1).flatten(2).permute(2, 0, 1)
        return feats, [None] * len(self.high_res) + [pos], self.feat_sizes


# ----------------------------------------------------------------------------------------- decode
def _half_autocast(sam2_model: SAM2Base):
    """A bf16/fp16 SAM2 only runs under CUDA autocast (its prompt encoder multiplies float32
    coordinates with its own buffer); the reference runs SAM2 under bf16 autocast anyway.
    CPU autocast cannot help (layer_norm then mixes float32 inputs with half weights)."""
    ref = sam2_model.no_mem_embed
    if ref.dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    if ref.device.type != "cuda":
        raise ValueError(f"SAM2 grounding: a {ref.dtype} SAM2 needs CUDA; use float32 on {ref.device.type}")
    return torch.autocast("cuda", dtype=ref.dtype)


def _prompt_embeddings(sam2_model: SAM2Base, prompts: torch.Tensor):
    """Empty point prompt (label -1 dummy + padding point) + the language token; dense = no_mask_embed."""
    batch, device = prompts.shape[0], prompts.device
    coords = torch.zeros(batch, 1, 2, device=device)
    labels = -torch.ones(batch, 1, dtype=torch.int32, device=device)
    sparse, dense = sam2_model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    sparse = torch.cat([sparse, prompts[:, None].to(sparse.dtype)], dim=1)
    return sparse, dense


def sam_heads_with_prompt(sam2_model: SAM2Base, pix_feat, high_res, prompts, veto: bool) -> dict:
    """SAM2Base._forward_sam_heads with the language token appended (no points, no mask input).

    Multimask follows ``_use_multimask(is_init_cond_frame=True, point_inputs=None)`` (True for v1
    hiera-L); if it were False, the mask decoder itself applies dynamic multimask via stability in
    eval mode, as SAM2 does. ``veto``: object-score logit <= 0 -> all logits NO_OBJ_SCORE (-1024).
    """
    sparse, dense = _prompt_embeddings(sam2_model, prompts)
    multimask = sam2_model._use_multimask(is_init_cond_frame=True, point_inputs=None)
    masks, ious, tokens, obj_logits = sam2_model.sam_mask_decoder(
        image_embeddings=pix_feat,
        image_pe=sam2_model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=list(high_res),
    )
    if veto and sam2_model.pred_obj_scores:
        masks = torch.where(obj_logits[:, :, None, None] > 0, masks, NO_OBJ_SCORE)
    masks = masks.float()
    rows = torch.arange(masks.shape[0], device=masks.device)
    best = ious.argmax(dim=-1) if multimask else torch.zeros_like(rows)
    return {"low_res_masks": masks[rows, best], "ious": ious, "best": best, "tokens": tokens,
            "object_score_logits": obj_logits, "multimask": multimask}


def decode_heads(sam2_model: SAM2Base, features: FrameFeatures, frame_ids, prompts, veto: bool) -> dict:
    """Gather features by frame id (no recompute) and decode them as initial conditioning frames."""
    frame_ids = torch.as_tensor(frame_ids, dtype=torch.long, device=features.low.device)
    if prompts.dim() != 2 or prompts.shape[0] != frame_ids.numel():
        raise ValueError(f"decode: prompts must be [M, hidden] with M = len(frame_ids) = {frame_ids.numel()}, "
                         f"got {tuple(prompts.shape)}")
    if frame_ids.numel() and (frame_ids.min() < 0 or frame_ids.max() >= len(features)):
        raise ValueError(f"decode: frame_ids must index the {len(features)} encoded frames")
    sel = features[frame_ids]
    prompts = prompts.to(sel.low.device)
    pix = sel.low + sam2_model.no_mem_embed.view(1, -1, 1, 1)  # directly-add no-memory path
    with _half_autocast(sam2_model):
        return sam_heads_with_prompt(sam2_model, pix, sel.high_res, prompts, veto)


def object_pointer(sam2_model: SAM2Base, heads: dict) -> torch.Tensor:
    """Object pointer of a decode, as SAM2Base._forward_sam_heads builds it (for memory tracking)."""
    tokens, obj_logits = heads["tokens"], heads["object_score_logits"]
    token = tokens[:, 0]
    if heads["multimask"] and tokens.size(1) > 1:
        token = tokens[torch.arange(tokens.shape[0], device=tokens.device), heads["best"]]
    ptr = sam2_model.obj_ptr_proj(token)
    if sam2_model.pred_obj_scores:
        lam = obj_logits.sigmoid() if sam2_model.soft_no_obj_ptr else (obj_logits > 0).float()
        if sam2_model.fixed_no_obj_ptr:
            ptr = lam * ptr
        ptr = ptr + (1 - lam) * sam2_model.no_obj_ptr
    return ptr


# ------------------------------------------------------------------------------------ propagation
@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Tracking must run in eval mode (dropout in memory attention, eval-only pointer/stride rules)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _frame_getter(features) -> Callable[[int], FrameFeatures]:
    get = features if callable(features) else (lambda t: features[t])

    def fetch(t: int) -> FrameFeatures:
        feat = get(t)
        if len(feat) != 1:
            raise ValueError(f"propagate: features for frame {t} must hold exactly 1 frame, got {len(feat)}")
        return feat

    return fetch


def _compact(maskmem, maskmem_pos, pred_masks, obj_ptr, obj_logits, memory_dtype) -> dict:
    """The per-frame entry SAM2VideoPredictor keeps (memory stored in ``memory_dtype``, bf16 there)."""
    return {"maskmem_features": maskmem.to(memory_dtype), "maskmem_pos_enc": maskmem_pos,
            "pred_masks": pred_masks.float(), "obj_ptr": obj_ptr, "object_score_logits": obj_logits}


def _encode_condition(sam2_model: SAM2Base, feat: FrameFeatures, low, object_score_logits, ptr,
                      memory_dtype) -> dict:
    """Memory-encode a conditioning frame's low-res logits [1,1,h,w] as the predictor's preflight does for
    prompted frames: upsampled bilinearly to image_size and encoded with ``is_mask_from_pts=True``
    (binarised when ``binarize_mask_from_pts_for_mem_enc`` is set, as in SAM2's inference build)."""
    size = (sam2_model.image_size, sam2_model.image_size)
    high = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    feats, _, sizes = feat.flat()
    maskmem, maskmem_pos = sam2_model._encode_new_memory(
        current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high.to(feats[-1].dtype),
        object_score_logits=object_score_logits, is_mask_from_pts=True)
    return _compact(maskmem, maskmem_pos, low, ptr, object_score_logits, memory_dtype)


def condition_frame(sam2_model: SAM2Base, feat: FrameFeatures, prompt, memory_dtype) -> dict:
    """Decode a frame with its prompt (= decode 'infer') and memory-encode the result."""
    heads = decode_heads(sam2_model, feat, [0], prompt.reshape(1, -1), veto=True)
    return _encode_condition(sam2_model, feat, heads["low_res_masks"][:, None], heads["object_score_logits"],
                             object_pointer(sam2_model, heads), memory_dtype)


def condition_frame_with_mask(sam2_model: SAM2Base, feat: FrameFeatures, frame_idx: int, mask: torch.Tensor,
                              output_dict: dict, num_frames: int, memory_dtype) -> dict:
    """Enter a binary mask [image_size, image_size] as ``SAM2VideoPredictor.add_new_mask`` does (an initial
    conditioning frame; with ``use_mask_input_as_output_without_sam`` the mask is the output and the
    decoder only gives the object pointer), then memory-encode it as the preflight does."""
    feats, pos, sizes = feat.flat()
    out = sam2_model.track_step(
        frame_idx=frame_idx, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
        feat_sizes=sizes, point_inputs=None, mask_inputs=mask.reshape(1, 1, *mask.shape[-2:]).to(feats[-1].dtype),
        output_dict=output_dict, num_frames=num_frames, track_in_reverse=False, run_mem_encoder=False)
    return _encode_condition(sam2_model, feat, out["pred_masks"], out["object_score_logits"], out["obj_ptr"],
                             memory_dtype)


def track_frame(sam2_model: SAM2Base, feat: FrameFeatures, frame_idx, output_dict, num_frames,
                memory_dtype) -> dict:
    """Track one non-conditioning frame from memory with SAM2Base.track_step (memory encoder on)."""
    feats, pos, sizes = feat.flat()
    out = sam2_model.track_step(
        frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=feats,
        current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
        output_dict=output_dict, num_frames=num_frames, track_in_reverse=False, run_mem_encoder=True)
    return _compact(out["maskmem_features"], out["maskmem_pos_enc"], out["pred_masks"], out["obj_ptr"],
                    out["object_score_logits"], memory_dtype)


def _check_cond_ids(cond_ids, num_frames: int) -> None:
    if not cond_ids:
        raise ValueError("propagate: no conditioning frame (need at least one prompted frame)")
    if min(cond_ids) < 0 or max(cond_ids) >= num_frames:
        raise ValueError(f"propagate: conditioning frame ids {sorted(cond_ids)} outside 0..{num_frames - 1}")


def _track_forward(sam2_model: SAM2Base, fetch, num_frames: int, condition: Callable[[int, dict], dict],
                   cond_ids, memory_dtype) -> torch.Tensor:
    """The predictor's loop: every conditioning frame first (``condition(t, state)`` -> its entry), then
    frames from the first conditioning frame forward, the others tracked from memory."""
    size = sam2_model.sam_image_embedding_size * 4
    out = torch.full((num_frames, size, size), NO_OBJ_SCORE, dtype=torch.float32,
                     device=sam2_model.no_mem_embed.device)
    state = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    with torch.no_grad(), _eval_mode(sam2_model), _half_autocast(sam2_model):
        for t in sorted(cond_ids):
            state["cond_frame_outputs"][t] = condition(t, state)
        for t in range(min(cond_ids), num_frames):
            entry = state["cond_frame_outputs"].get(t)
            if entry is None:
                entry = track_frame(sam2_model, fetch(t), t, state, num_frames, memory_dtype)
                state["non_cond_frame_outputs"][t] = entry
            out[t] = entry["pred_masks"][0, 0]
    return out


def propagate_with_memory(sam2_model: SAM2Base, features, num_frames: int, cond_frames: PromptMap,
                          memory_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Path C: low-res logits [num_frames, h, w] (float32) for every frame.

    ``features``: FrameFeatures of all frames, or ``fn(frame_idx) -> 1-frame FrameFeatures`` (cached
    per-frame features). ``cond_frames``: {frame_idx: prompt [hidden]}. Like SAM2VideoPredictor: all
    conditioning frames are decoded and memory-encoded first, then frames are visited forward from
    the first conditioning frame to num_frames-1; conditioning frames return their conditioning
    logits, the others are tracked from memory (all conditioning memories when
    ``max_cond_frames_in_attn == -1``, the ``num_maskmem-1`` latest tracked frames, object pointers).
    Frames before the first conditioning frame are never visited (forward only): they get -1024.
    """
    _check_cond_ids(cond_frames, num_frames)
    fetch = _frame_getter(features)
    return _track_forward(sam2_model, fetch, num_frames,
                          lambda t, state: condition_frame(sam2_model, fetch(t), cond_frames[t], memory_dtype),
                          cond_frames, memory_dtype)


def mask_input(mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """A mask of any size -> the float 0/1 [image_size, image_size] input SAM2VideoPredictor.add_new_mask
    makes of it (bilinear, antialiased resize, >= 0.5)."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:])
    if tuple(m.shape[-2:]) != (image_size, image_size):
        m = F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        m = (m >= 0.5).float()
    return m[0, 0]


def propagate_masks_with_memory(sam2_model: SAM2Base, features, num_frames: int, cond_masks: PromptMap,
                                memory_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Sa2VA-i style Path C: binary masks of the conditioning frames ({frame_idx: [H, W]}, any size, e.g.
    the fine-tuned model's predictions at video resolution) enter ``sam2_model`` (the original SAM2
    weights) as SAM2VideoPredictor.add_new_mask enters them, and every later frame is tracked from memory
    with ``sam2_model`` on its own ``features``. Low-res logits of every frame as the predictor gives them
    (a conditioning frame: its mask as output, +-10)."""
    _check_cond_ids(cond_masks, num_frames)
    fetch = _frame_getter(features)

    def condition(t: int, state: dict) -> dict:
        return condition_frame_with_mask(sam2_model, fetch(t), t, mask_input(cond_masks[t], sam2_model.image_size),
                                         state, num_frames, memory_dtype)

    return _track_forward(sam2_model, fetch, num_frames, condition, cond_masks, memory_dtype)


def load_official_sam2_weights(sam2_model: nn.Module, path: str) -> None:
    """Official SAM2 checkpoint ``{'model': state_dict}`` (``.gamma`` layer scales accepted) -> ``sam2_model``,
    strict. Read with ``weights_only=True``: tensors and plain containers only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: expected a dict with the SAM2 weights under the key 'model'")
    try:
        sam2_model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: SAM2 weights do not match the grounding encoder: {err}") from err


# ------------------------------------------------------------------------------------------ module
class SAM2Grounding(nn.Module):
    """SAM2 with a language prompt token: the ``grounding_encoder`` of the chat model.

    Parameters live in ``self.sam2_model`` (a SAM2Base), so names are
    ``grounding_encoder.sam2_model.*``; CXBlock layer scales are ``.g_weight`` (``.gamma`` accepted).
    """

    def __init__(self, sam2_config: Union[str, Mapping, None] = "sam2_hiera_l"):
        super().__init__()
        self.sam2_config = resolve_sam2_config(sam2_config)
        self.sam2_model = build_sam2_model(self.sam2_config)
        if not self.sam2_model.use_high_res_features_in_sam:
            raise ValueError("sam2_config: use_high_res_features_in_sam must be true (SAM2 v1 hiera-L setting)")

    @property
    def hidden_dim(self) -> int:
        return self.sam2_model.hidden_dim

    @property
    def image_size(self) -> int:
        return self.sam2_model.image_size

    @property
    def low_res_size(self) -> int:
        return self.sam2_model.sam_image_embedding_size * 4

    def _param(self) -> torch.Tensor:
        return self.sam2_model.no_mem_embed

    def freeze_for_training(self) -> None:
        """Spec §1.8: everything frozen except the mask decoder (which includes conv_s0/conv_s1)."""
        self.requires_grad_(False)
        self.sam2_model.sam_mask_decoder.requires_grad_(True)

    def preprocess(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Pixel values [N,3,S,S] (uint8, or float on the same 0..255 scale) -> x/255, ImageNet-normalised.

        Frames not already image_size x image_size are resized here (bicubic, antialias, clamped and,
        for uint8 input, rounded); the reference resizes with PIL bicubic before this step.
        """
        x = images[None] if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"preprocess: expected images [N,3,H,W], got {tuple(images.shape)}")
        is_uint8 = x.dtype == torch.uint8
        x = x.float()
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 255)
            x = x.round() if is_uint8 else x
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return ((x / 255.0 - mean) / std).to(dtype)

    def _encode_chunk(self, images: torch.Tensor) -> FrameFeatures:
        """Frozen trunk+neck under no_grad; conv_s0/conv_s1 (mask-decoder, trainable) keep autograd."""
        model, ref = self.sam2_model, self._param()
        images = images.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            out = model.image_encoder(images)
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        if len(fpn) != 3:
            raise ValueError(f"sam2 image encoder returned {len(fpn)} levels, expected 3 (scalp=1)")
        dec = model.sam_mask_decoder
        high = (dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1]))
        return FrameFeatures(high, fpn[2], pos[2][:1].clone())

    def encode(self, images: torch.Tensor, chunk_size: int = 8) -> FrameFeatures:
        """Preprocessed frames [N,3,S,S] -> FrameFeatures, running the encoder ``chunk_size`` frames at a time."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"encode: expected [N,3,{self.image_size},{self.image_size}], got {tuple(images.shape)}")
        return FrameFeatures.cat([self._encode_chunk(c) for c in images.split(max(1, chunk_size))])

    def decode(self, features: FrameFeatures, frame_ids, prompts: torch.Tensor, mode: str = "train") -> torch.Tensor:
        """Low-res logits [M, h, w] float32: frame_ids[m] is decoded with prompts[m].

        'train': no NO_OBJ veto (gradients reach the mask decoder); 'infer': object-score logit <= 0
        -> the whole mask is -1024. Both: 3 masks, highest predicted IoU.
        """
        if mode not in ("train", "infer"):
            raise ValueError(f"decode: mode must be 'train' or 'infer', got {mode!r}")
        heads = decode_heads(self.sam2_model, features, frame_ids, prompts, veto=(mode == "infer"))
        return heads["low_res_masks"]

    def decode_train(self, features: FrameFeatures, lang: torch.Tensor) -> torch.Tensor:
        """Spec §1.8: lang [F, K, hidden] -> pred [F, K, h, w]; features expanded per object, frame-major."""
        if lang.dim() != 3 or lang.shape[0] != len(features):
            raise ValueError(f"decode_train: lang must be [F={len(features)}, K, hidden], got {tuple(lang.shape)}")
        n_frames, n_obj = lang.shape[:2]
        ids = torch.arange(n_frames, device=features.low.device).repeat_interleave(n_obj)
        masks = self.decode(features, ids, lang.reshape(n_frames * n_obj, -1), mode="train")
        return masks.view(n_frames, n_obj, *masks.shape[-2:])

    def upsample_logits(self, low_res: torch.Tensor, size, chunk_size: int = 16) -> torch.Tensor:
        """[M,h,w] -> [M,H,W] in two explicit bilinear steps (align_corners=False), like the reference:

        1. low-res (image_size/4) -> image_size x image_size, as SAM2's predictor makes its video-res
           input (_forward_sam_heads' high_res_masks, evaluation.md §1.1 step 5);
        2. image_size -> original H x W (evaluation.md §1.1 step 6, §2.4), undoing the square squash.
        Done ``chunk_size`` masks at a time to bound the image_size^2 intermediate.
        """
        square = (self.image_size, self.image_size)
        parts = []
        for chunk in low_res.float().split(max(1, chunk_size)):
            x = F.interpolate(chunk[:, None], size=square, mode="bilinear", align_corners=False)
            parts.append(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)[:, 0])
        if not parts:
            return low_res.new_zeros((0, *size), dtype=torch.float32)
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (one chunk: no full-size copy)

    def with_original_weights(self, path: str) -> "SAM2Grounding":
        """A twin of this module (same config, so the same inference build) holding the original SAM2
        weights of ``path``, on this module's device and dtype, frozen, in eval mode."""
        twin = SAM2Grounding(self.sam2_config)
        load_official_sam2_weights(twin.sam2_model, path)
        ref = self._param()
        return twin.to(device=ref.device, dtype=ref.dtype).eval().requires_grad_(False)

    def propagate(self, features, num_frames: int, cond_frames: PromptMap, sam2_model: SAM2Base | None = None,
                  memory_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Path C memory propagation (see propagate_with_memory); defaults to this module's weights."""
        model = self.sam2_model if sam2_model is None else sam2_model
        return propagate_with_memory(model, features, num_frames, cond_frames, memory_dtype=memory_dtype)
