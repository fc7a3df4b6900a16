"""Inference helpers shared by the video and image paths (spec evaluation.md §1-2, §11): options,
prompt building, tokenisation, [SEG] projection and logits -> masks/probabilities.

Duck-typed on the chat model (no import of the model class). Copied into every export folder; it must
not import video_context.py (transformers' remote-code loader loops forever on an import cycle).
"""
from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from .templates import IMG_END_TOKEN, get_template

IMAGE_PLACEHOLDER = "<image>"
PROPAGATION = ("memory", "none", "memory_original_sam2")
PATH_B_AVERAGE = ("logits", "probs")


# ============================================================================================ options
@dataclass(frozen=True)
class InferenceOptions:
    """Per-call behaviour switches; every default is the faithful reference behaviour (spec §11.1).

    q_frame_anchor_fix: Q1 (q_frame, L > N) condition the selected frames themselves and propagate
        forward and backward, instead of real frames 0..N-1.
    uncovered_fix: Q3 (q_frame, L < N) decode frames absent from the list with the nearest copy's clip.
    path_b_average: Q4 'logits' (faithful, a -1024 'no object' copy dominates) or 'probs'.
    propagation: 'memory' (faithful Path C: the fine-tuned SAM2 tracks from memory), 'none' (decode every
        frame on its own with a Path A mapping; see VideoContext.plan_for) or 'memory_original_sam2'
        (Sa2VA-i: the fine-tuned decoder's conditioning masks enter the original SAM2 weights of
        ``sam2_original_checkpoint``, which track the other frames). Only Path C depends on it.
    sam2_original_checkpoint: official SAM2 ``.pt`` (e.g. sam2_hiera_large.pt) for
        'memory_original_sam2'; required there and refused elsewhere.
    max_new_tokens: generation limit (spec §2.2: 2048).
    """

    q_frame_anchor_fix: bool = False
    uncovered_fix: bool = False
    path_b_average: str = "logits"
    propagation: str = "memory"
    sam2_original_checkpoint: Optional[str] = None
    max_new_tokens: int = 2048

    def __post_init__(self):
        for name in ("q_frame_anchor_fix", "uncovered_fix"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"option {name} must be a bool, got {getattr(self, name)!r}")
        if self.path_b_average not in PATH_B_AVERAGE:
            raise ValueError(f"option path_b_average must be one of {PATH_B_AVERAGE}, got {self.path_b_average!r}")
        if self.propagation not in PROPAGATION:
            raise ValueError(f"option propagation must be one of {PROPAGATION}, got {self.propagation!r}")
        ckpt = self.sam2_original_checkpoint
        if self.propagation == "memory_original_sam2":
            if not isinstance(ckpt, str) or not ckpt:
                raise ValueError("option propagation='memory_original_sam2' needs sam2_original_checkpoint "
                                 "(the path of an official SAM2 .pt file)")
        elif ckpt is not None:
            raise ValueError(f"option sam2_original_checkpoint is only used with "
                             f"propagation='memory_original_sam2', got propagation={self.propagation!r}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"option max_new_tokens must be an int >= 1, got {m!r}")


OPTION_NAMES = tuple(f.name for f in fields(InferenceOptions))
CONTEXT_OPTION_NAMES = ("naive", "feature_budget_bytes")


def split_options(options: Mapping[str, Any], allow_context: bool = True) -> tuple[InferenceOptions, dict]:
    """Named options -> (InferenceOptions, VideoContext keyword options); unknown names raise."""
    known = OPTION_NAMES + (CONTEXT_OPTION_NAMES if allow_context else ())
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown predict option(s) {unknown}; known options: {list(known)}")
    per_call = {k: v for k, v in options.items() if k in OPTION_NAMES}
    ctx = {k: v for k, v in options.items() if k in CONTEXT_OPTION_NAMES}
    return InferenceOptions(**per_call), ctx


# ============================================================================================ inputs
def to_pil(image, what: str = "image") -> Image.Image:
    """PIL images pass through (converted to RGB); HxWx3 uint8 arrays are wrapped."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return Image.fromarray(image)
    raise ValueError(f"{what}: expected a PIL image or an HxWx3 uint8 array, got {type(image).__name__}"
                     f"{'' if not hasattr(image, 'shape') else ' of shape ' + str(tuple(image.shape))}")


def build_prompt_text(text: str, image_tokens: Optional[str], template_name: str, past_text: str = "") -> str:
    """past_text + the template's INSTRUCTION around the user text, '<image>' replaced (spec §2.1).

    Single round, no system prompt. A visual input needs the '<image>' placeholder in ``text``
    (templates.eval_prompt always adds it); a follow-up round (``past_text``) must not repeat it.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    past_text = past_text or ""
    if image_tokens is not None:
        if IMAGE_PLACEHOLDER in text:
            if past_text:
                raise ValueError("text contains '<image>' but past_text is not empty: images are only "
                                 "inserted in the first round")
            text = text.replace(IMAGE_PLACEHOLDER, image_tokens)
        elif IMAGE_PLACEHOLDER not in past_text and IMG_END_TOKEN not in past_text:
            raise ValueError(f"text {text[:80]!r} has no '<image>' placeholder, so the image/video would not "
                             f"reach the model; use e.g. templates.eval_prompt(expression)")
    elif IMAGE_PLACEHOLDER in text:
        raise ValueError("text contains '<image>' but no image or video was given")
    template = get_template(template_name)
    return past_text + template["INSTRUCTION"].format(input=text)


def tokenize_prompt(tokenizer, prompt: str, device) -> torch.Tensor:
    """[1, n] ids with the tokenizer's default special tokens (spec §2.1)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return ids.to(device)


def tokenize_prompt_split(tokenizer, prompt: str, cache: dict, split_token: str = IMG_END_TOKEN) -> torch.Tensor:
    """[1, n] CPU ids equal to ``tokenize_prompt(tokenizer, prompt, "cpu")``, with the prompt's head tokenized
    once per ``cache`` (a dict the caller keeps, e.g. one per video).

    The head runs through the last ``split_token`` (the template and every image placeholder: ~5k tokens for
    20 images, the same string for every expression and mode of a video); the tail is tokenized after a
    lone ``split_token`` -- an added token, split off before anything else, so nothing merges across it --
    which is then dropped. The first prompt of each head is also tokenized whole and compared: a tokenizer
    for which the two differ (one that appends EOS, say) is tokenized whole from then on (``cache``).
    """
    cut = prompt.rfind(split_token)
    if cut < 0 or cache.get("whole"):
        return tokenize_prompt(tokenizer, prompt, "cpu")
    head, rest = prompt[:cut + len(split_token)], prompt[cut + len(split_token):]
    heads = cache.setdefault("heads", {})
    head_ids = heads.get(head)
    check = head_ids is None
    if check:
        head_ids = tokenize_prompt(tokenizer, head, "cpu")
    tail = tokenizer(split_token + rest, add_special_tokens=False, return_tensors="pt").input_ids
    split_off = tail.shape[1] > 0 and int(tail[0, 0]) == token_id(tokenizer, split_token)
    ids = torch.cat([head_ids, tail[:, 1:]], dim=1) if split_off else None
    if check or ids is None:
        whole = tokenize_prompt(tokenizer, prompt, "cpu")
        if ids is None or not torch.equal(whole, ids):
            cache["whole"] = True
            return whole
        heads[head] = head_ids
    return ids


def canonical_boundary(ids, img_end_id: Optional[int]) -> int:
    """Where the prompt is split for prefix caching: right after its last '</img>' (0 = no split).
    ``ids``: [1, n] tensor, or the n token ids as a sequence (no device read).

    The split depends only on the tokens, never on what happens to be cached, so a fresh call and a
    cache hit run exactly the same two prefill chunks (bitwise-equal results on CPU).
    """
    if img_end_id is None:
        return 0
    tokens = ids[0].tolist() if isinstance(ids, torch.Tensor) else ids
    try:
        boundary = len(tokens) - tokens[::-1].index(img_end_id)
    except ValueError:  # no '</img>'
        return 0
    return boundary if boundary < len(tokens) else 0


def token_id(tokenizer, token: str) -> Optional[int]:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(tid)


DECODE_ATTENTION_CHOICES = ("sdpa", "matmul")  # generate_answers(decode_attention=...) without exact passes
# matmul: 3.5-13x faster than SDPA per decode step at batches of 8-64 rows on an H200 (4B shapes, bf16),
# whose repeat_kv copies every row's cache to all query heads (docs/benchmarks, 2026-11-27)
DEFAULT_DECODE_ATTENTION = "matmul"


def check_decode_attention(value: str) -> str:
    """``value`` if it names a decode attention (generate_answers / VideoContext), else ValueError."""
    if value not in DECODE_ATTENTION_CHOICES:
        raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION_CHOICES}, got {value!r}")
    return value


# ============================================================================================ model bits
def model_device(model) -> torch.device:
    return next(model.parameters()).device


def module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


@contextlib.contextmanager
def eval_mode(model):
    """Inference must not run dropout; the caller's train/eval state is restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def seg_prompts(model, seg_hidden_states: torch.Tensor) -> torch.Tensor:
    """[n_seg, D] last-layer [SEG] states -> text_hidden_fcs -> [n_seg, sam2 hidden] (spec §2.3)."""
    fcs = model.text_hidden_fcs
    return fcs(seg_hidden_states.to(dtype=module_dtype(fcs), device=model_device(model)))


def probs_format(return_probs) -> Optional[str]:
    """``return_probs`` of the predict entry points -> None (no probabilities), "float32" (sigmoid
    probabilities, True) or "uint8" (round(255 p), what the evaluation stores; see quantize_probs_tensor)."""
    if isinstance(return_probs, (bool, np.bool_)):
        return "float32" if return_probs else None
    if return_probs in ("float32", "uint8"):
        return return_probs
    raise ValueError(f"return_probs must be True, False, 'float32' or 'uint8', got {return_probs!r}")


def quantize_probs_tensor(p: torch.Tensor) -> torch.Tensor:
    """Float32 probabilities in [0,1] -> uint8 round(255 p) on their own device, byte for byte what
    ``evaluation.averaging.quantize_probs`` makes of the same float32 array (float32 product, round half to
    even, clipped; NaNs must be gone). The device sends a quarter of the bytes and the CPU skips a pass
    over every full-size probability map."""
    return (p.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)  # in place: ~4x faster on a CPU


def logits_to_outputs(grounding, low_res: torch.Tensor, size: tuple[int, int], return_probs,
                      chunk: int = 16, staged: Optional[bool] = None,
                      transfer_bytes: int = 64 << 20) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Low-res logits [M,h,w] -> bool masks [M,H,W] (+ probabilities, ``probs_format(return_probs)``:
    float32 or uint8) on the CPU (spec §2.4).

    Two-step bilinear upsampling, sigmoid, > 0.5. NaN logits (a Path B frame without any copy, faithful
    Q3) give an empty mask and probability 0, so the probabilities stay consistent with the masks.
    Chunked so a long high-resolution video never holds all full-size maps on the device at once.
    ``staged`` (default: off the CPU): masks and uint8 probabilities of up to ``transfer_bytes`` are put in
    one device buffer and copied to the host in one transfer -- each copy (and the NaN check) is a sync in
    which the model's thread drops the GIL and may wait for the writer threads to hand it back. Same bits.
    """
    fmt = probs_format(return_probs)
    h, w = int(size[0]), int(size[1])
    m = low_res.shape[0]
    if staged is None:
        staged = low_res.device.type != "cpu"
    if staged:
        return _logits_to_outputs_staged(grounding, low_res, (h, w), fmt, chunk, transfer_bytes)
    masks = np.zeros((m, h, w), dtype=bool)
    probs = np.zeros((m, h, w), dtype=np.dtype(fmt)) if fmt else None
    # finite logits upsample to finite ones: full-size NaNs come only from NaN low-res logits
    has_nan = bool(torch.isnan(low_res).any()) if fmt else False
    for start in range(0, m, chunk):
        up = grounding.upsample_logits(low_res[start:start + chunk], (h, w))
        p = torch.sigmoid(up.float())
        masks[start:start + chunk] = (p > 0.5).cpu().numpy()
        if probs is not None:
            p = torch.nan_to_num(p, nan=0.0) if has_nan else p
            probs[start:start + chunk] = (quantize_probs_tensor(p) if fmt == "uint8" else p).cpu().numpy()
    return masks, probs


def _logits_to_outputs_staged(grounding, low_res: torch.Tensor, size: tuple[int, int], fmt: Optional[str],
                              chunk: int, transfer_bytes: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """logits_to_outputs with one device -> host transfer per ``transfer_bytes`` of frames (usually one
    per prediction): planes [mask, uint8 probability] of a group of frames in one uint8 buffer; float32
    probabilities in a buffer of their own. nan_to_num is applied without looking for NaNs first (it
    changes nothing else), so nothing is read back before the transfer."""
    h, w = size
    m = low_res.shape[0]
    if m == 0:
        return np.zeros((0, h, w), dtype=bool), (np.zeros((0, h, w), dtype=np.dtype(fmt)) if fmt else None)
    planes = 2 if fmt == "uint8" else 1
    per_frame = h * w * (planes + (4 if fmt == "float32" else 0))
    # whole chunks per group: the same chunks as the per-chunk path (a CPU kernel's bits depend on its batch)
    chunk = max(1, int(chunk))
    group = min(m, max(chunk, int(transfer_bytes) // max(per_frame, 1) // chunk * chunk))
    masks = probs = None
    if group < m:
        masks = np.empty((m, h, w), dtype=bool)
        probs = np.empty((m, h, w), dtype=np.dtype(fmt)) if fmt else None
    for g0 in range(0, m, group):
        g1 = min(m, g0 + group)
        buf = torch.empty((planes, g1 - g0, h, w), dtype=torch.uint8, device=low_res.device)
        fbuf = torch.empty((g1 - g0, h, w), dtype=torch.float32, device=low_res.device) if fmt == "float32" else None
        for c0 in range(g0, g1, chunk):
            c1 = min(g1, c0 + chunk)
            p = torch.sigmoid(grounding.upsample_logits(low_res[c0:c1], (h, w)).float())
            buf[0, c0 - g0:c1 - g0] = p > 0.5
            if fmt:
                p = torch.nan_to_num(p, nan=0.0)
                if fmt == "uint8":
                    buf[1, c0 - g0:c1 - g0] = quantize_probs_tensor(p)
                else:
                    fbuf[c0 - g0:c1 - g0] = p
        host = buf.cpu().numpy()
        host_p = fbuf.cpu().numpy() if fbuf is not None else (host[1] if fmt == "uint8" else None)
        if group == m:  # one transfer: the outputs are views of the host buffer, no further copy
            return host[0].view(np.bool_), host_p
        masks[g0:g1] = host[0].view(np.bool_)
        if probs is not None:
            probs[g0:g1] = host_p
    return masks, probs


def empty_probs(shape: tuple, return_probs) -> Optional[np.ndarray]:
    """All-zero probabilities in ``probs_format(return_probs)`` (None when none are asked for)."""
    fmt = probs_format(return_probs)
    return np.zeros(shape, dtype=np.dtype(fmt)) if fmt else None


def make_result(text: str, masks: list, probs: Optional[list], num_seg: int, status: str,
                return_probs: bool) -> dict:
    out = {"prediction": text, "prediction_masks": masks, "num_seg": int(num_seg), "status": status}
    if return_probs:
        out["probabilities"] = probs if probs is not None else []
    return out
