"""Which frames the MLLM sees and which `[SEG]` decodes which frame (spec evaluation.md §1.3-1.7).

One module for training and inference so that both sides agree on the index rules. Everything is
pure integer arithmetic except :func:`combine_decoded_logits`, which applies a :class:`DecodePlan`
to SAM2 outputs.

General form: ``num_samples = num_clips * clip_len`` sampled indices (defaults 100 = 10 x 10),
split into ``num_clips`` consecutive clips. ``L`` is the number of frames of the video.

Faithful behaviour is the default; the fixes of spec §1.7 (Q1 anchor placement, Q3 uncovered
frames, Q4 probability averaging) are named keyword options (spec §11.1).
"""
from __future__ import annotations

import logging
import numbers
import operator
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

MODES = ("uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus")
TRAINING_STRATEGIES = ("wrap_around", "uniform")
PATHS = ("A", "B", "C")


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown frame-sampling mode {mode!r}; expected one of {list(MODES)}")


def _clip_len(num_samples: int, num_clips: int) -> int:
    """Frames per clip; the sample count must split into whole clips."""
    num_clips = _check_positive_int(num_clips, "num_clips")
    if num_samples % num_clips != 0:
        raise ValueError(
            f"num_samples={num_samples} is not a multiple of num_clips={num_clips}; "
            f"expected num_samples = num_clips * clip_len")
    return num_samples // num_clips


def _check_index_list(indices, num_frames: int, num_samples: int | None, what: str) -> list[int]:
    """Copy `indices` to plain ints, checking count and range [0, L)."""
    if indices is None:
        raise ValueError(f"{what}: expected a list of {num_samples} frame indices, got None")
    try:
        items = list(indices)
    except TypeError:
        raise ValueError(f"{what}: expected a list of frame indices, got {type(indices).__name__}") from None
    if num_samples is not None and len(items) != num_samples:
        raise ValueError(f"{what}: expected exactly {num_samples} frame indices, got {len(items)}")
    out = []
    for pos, v in enumerate(items):
        try:  # ints, numpy ints and 0-d integer tensors; not floats or bools
            if isinstance(v, (bool, np.bool_)):
                raise TypeError
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"{what}: entry {pos} is {v!r}; expected an int in [0, {num_frames})") from None
        if not 0 <= v < num_frames:
            raise ValueError(f"{what}: entry {pos} is {v}; expected an int in [0, {num_frames}) "
                             f"(0-based index into the sorted list of {num_frames} frames)")
        out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# index lists
# ----------------------------------------------------------------------------------------------
def _uniform(num_frames: int, num_samples: int) -> list[int]:
    """S[i] = floor(i*L/N): repeats for L < N, skips frames for L > N, identity for L = N."""
    return [i * num_frames // num_samples for i in range(num_samples)]


def _wrap(num_frames: int, num_samples: int) -> list[int]:
    """sorted(i mod L): contiguous repeats for L < N, the first N frames for L >= N."""
    return sorted(i % num_frames for i in range(num_samples))


def select_indices(num_frames: int, mode: str, num_samples: int = 100,
                   selected: list[int] | None = None) -> list[int]:
    """The `num_samples` frame indices the MLLM sees in inference `mode` (spec §1.3).

    q_frame takes the list from ``selected_frames.json`` as is (order and repeats kept, as the
    reference does); it must hold exactly `num_samples` ints in [0, L).
    """
    L = _check_positive_int(num_frames, "num_frames")
    N = _check_positive_int(num_samples, "num_samples")
    _check_mode(mode)
    if mode == "q_frame":
        if selected is None:
            raise ValueError(f"mode 'q_frame' needs `selected`: the {N} selected frame indices of this "
                             f"expression (selected_frames.json), got None")
        return _check_index_list(selected, L, N, "q_frame selected frames")
    if mode in ("uniform", "uniform_plus"):
        return _uniform(L, N)
    if mode == "wrap_around":
        return _wrap(L, N)
    # wrap_around_plus: wrap-around for short videos, uniform for long ones
    return _wrap(L, N) if L <= N else _uniform(L, N)


def training_indices(num_frames: int, num_samples: int = 100, strategy: str = "wrap_around") -> list[int]:
    """Training frame selection (spec model_training §4.2): wrap-around (faithful) or uniform (option)."""
    L = _check_positive_int(num_frames, "num_frames")
    N = _check_positive_int(num_samples, "num_samples")
    if strategy == "wrap_around":
        return _wrap(L, N)
    if strategy == "uniform":
        return _uniform(L, N)
    raise ValueError(f"unknown training frame strategy {strategy!r}; expected one of {list(TRAINING_STRATEGIES)}")


def split_clips(indices: list[int], num_clips: int = 10) -> list[list[int]]:
    """Consecutive equal chunks; clip c = indices[c*clip_len : (c+1)*clip_len], key frame first."""
    items = list(indices)
    n = _clip_len(len(items), num_clips)
    if n == 0:
        raise ValueError(f"cannot split {len(items)} indices into {num_clips} non-empty clips")
    return [items[c * n:(c + 1) * n] for c in range(num_clips)]


def floor_clip(frame: int, num_frames: int, num_clips: int = 10) -> int:
    """m(f) = floor(num_clips*f/L): the 'temporal segment' rule, kept exactly (spec §1.5)."""
    return num_clips * frame // num_frames


def first_clip_map(indices: list[int], num_frames: int, num_clips: int = 10) -> list[int | None]:
    """For each real frame, the clip of its first occurrence in `indices` (None if absent)."""
    n = _clip_len(len(indices), num_clips)
    out: list[int | None] = [None] * num_frames
    for pos, f in enumerate(indices):
        if out[f] is None:
            out[f] = pos // n
    return out


# ----------------------------------------------------------------------------------------------
# decode plans
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePlan:
    """How SAM2 turns the `[SEG]` prompts into one logit map per real frame (spec §1.4).

    path: "A" independent decode of every real frame, "B" decode the virtual frames and average the
    copies of each real frame, "C" decode conditioning frames then propagate with SAM2 memory.
    decode_frames[j] is the real frame of decode call j, prompt_index[j] the `[SEG]`/clip it uses.
    """
    path: str
    decode_frames: list[int]
    prompt_index: list[int]
    num_frames: int
    propagate: bool


def decode_plan(num_frames: int, mode: str, indices: list[int], num_clips: int = 10, *,
                q_frame_anchor_fix: bool = False, uncovered_fix: bool = False) -> DecodePlan:
    """Path and frame -> prompt mapping of `mode` for a video of L frames (spec §1.4-1.5).

    `indices` is the sampled list (:func:`select_indices`); its length is num_samples. For the
    deterministic modes it must equal ``select_indices(L, mode, len(indices))`` (catches mix-ups).

    Options (faithful when False):
    * q_frame_anchor_fix (Q1, q_frame with L > N): condition the deduplicated selected frames
      S[j] with P_{j // clip_len} (first occurrence wins) instead of real frames 0..N-1. The
      plan's decode_frames are then sorted by frame; frames before the first one need backward
      propagation (the caller checks ``min(plan.decode_frames) > 0``).
    * uncovered_fix (Q3, q_frame with L < N): a real frame absent from the list is decoded once
      more, as itself, with the clip of the nearest selected copy (ties: the earlier frame), instead
      of averaging an empty set (NaN -> empty mask). Logged as a warning.
    """
    L = _check_positive_int(num_frames, "num_frames")
    _check_mode(mode)
    idx = _check_index_list(indices, L, None, f"decode_plan({mode}) indices")
    N = len(idx)
    n = _clip_len(N, num_clips)
    if n == 0:
        raise ValueError(f"decode_plan: got no indices; expected num_clips * clip_len indices "
                         f"(a positive multiple of {num_clips})")
    if mode != "q_frame":
        expected = select_indices(L, mode, N)
        if idx != expected:
            raise ValueError(f"decode_plan({mode}, L={L}): indices differ from select_indices(L, mode, {N}); "
                             f"pass the list select_indices returned")

    def path_a(mapping: list[int]) -> DecodePlan:
        return DecodePlan("A", list(range(L)), mapping, L, False)

    def path_c(frames: list[int], prompts: list[int]) -> DecodePlan:
        return DecodePlan("C", frames, prompts, L, True)

    floor_map = [floor_clip(f, L, num_clips) for f in range(L)]
    if L == N:  # every mode (q_frame too, whatever its list says: Q2) is Path A with f // clip_len
        return path_a(floor_map)
    if L > N:
        if mode in ("uniform", "uniform_plus", "wrap_around_plus"):
            return path_a(floor_map)
        if mode == "q_frame" and q_frame_anchor_fix:
            first: dict[int, int] = {}
            for pos, f in enumerate(idx):
                first.setdefault(f, pos // n)
            frames = sorted(first)
            return path_c(frames, [first[f] for f in frames])
        # wrap_around, faithful q_frame: real frames 0..N-1 with P_{f // clip_len}
        return path_c(list(range(N)), [f // n for f in range(N)])
    # L < N
    if mode == "uniform":
        return path_a(floor_map)
    if mode in ("wrap_around", "wrap_around_plus"):
        first_map = first_clip_map(idx, L, num_clips)
        return path_a([int(c) for c in first_map])  # wrap lists cover every frame when L <= N
    # uniform_plus, q_frame: Path B over the N virtual frames
    frames = list(idx)
    prompts = [pos // n for pos in range(N)]
    covered = set(idx)
    missing = [f for f in range(L) if f not in covered]
    if missing:
        if uncovered_fix:
            for f in missing:
                frames.append(f)
                prompts.append(_nearest_copy_clip(idx, f, n))
            logger.warning("q_frame: %d of %d frames are not in the selected list (%s); decoding them with "
                           "the clip of the nearest selected frame (uncovered_fix)", len(missing), L,
                           _short_list(missing))
        else:
            logger.warning("q_frame: %d of %d frames are not in the selected list (%s); faithful mode gives "
                           "them NaN logits -> empty masks (set uncovered_fix to decode them)", len(missing), L,
                           _short_list(missing))
    return DecodePlan("B", frames, prompts, L, False)


def _nearest_copy_clip(idx: list[int], frame: int, clip_len: int) -> int:
    """Clip of the selected copy nearest in time to `frame` (earlier frame on a distance tie).

    For an earlier frame its last copy is used, for a later frame its first copy: the copy whose
    clip lies closest to the missing frame.
    """
    best = min(set(idx), key=lambda s: (abs(s - frame), s))
    positions = [pos for pos, s in enumerate(idx) if s == best]
    pos = positions[-1] if best < frame else positions[0]
    return pos // clip_len


def _short_list(items: list[int], limit: int = 10) -> str:
    head = ", ".join(str(i) for i in items[:limit])
    return head + (", ..." if len(items) > limit else "")


def seg_prompt_indices(num_seg: int, num_clips: int = 10) -> list[int] | None:
    """Which generated `[SEG]` serves each clip (spec Q5).

    More than num_clips -> the first num_clips; 1..num_clips-1 -> the last one repeats to fill;
    0 -> None (the caller emits empty masks and records the expression as failed).
    """
    if isinstance(num_seg, bool) or not isinstance(num_seg, numbers.Integral) or num_seg < 0:
        raise ValueError(f"num_seg must be an int >= 0, got {num_seg!r}")
    num_clips = _check_positive_int(num_clips, "num_clips")
    if num_seg == 0:
        return None
    return [min(k, int(num_seg) - 1) for k in range(num_clips)]


# ----------------------------------------------------------------------------------------------
# combining decoded logits
# ----------------------------------------------------------------------------------------------
def long_index(values, device) -> torch.Tensor:
    """int64 index tensor on ``device``, built on the host and copied without blocking: a blocking copy
    waits for every kernel queued before it, and the hot loops build several per prediction."""
    t = torch.as_tensor(values, dtype=torch.long)
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def combine_decoded_logits(plan: DecodePlan, logits: torch.Tensor, average: str = "logits") -> torch.Tensor:
    """Turn the per-decode-call logits [len(decode_frames), h, w] into the plan's outputs.

    Path A: one map per real frame, in frame order ([L, h, w]).
    Path B: per real frame, the arithmetic mean over its copies ([L, h, w]). ``average="logits"``
    is faithful (Q4: a -1024 'no object' copy dominates); ``average="probs"`` averages sigmoids and
    maps back to logits (clamped to +-1024 so later resizing never meets infinities). A frame with
    no copy gets NaN (faithful Q3: sigmoid(NaN) > 0.5 is False -> empty mask).
    Path C: only the conditioning outputs, in decode order; the caller runs the propagation.
    """
    if average not in ("logits", "probs"):
        raise ValueError(f"average must be 'logits' or 'probs', got {average!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a torch tensor [num_decodes, h, w]")
    if logits.shape[0] != len(plan.decode_frames):
        raise ValueError(f"logits has {logits.shape[0]} maps but the plan has {len(plan.decode_frames)} "
                         f"decode calls (path {plan.path})")
    if plan.path == "C":
        return logits
    if plan.path == "A":  # checked on the host: reading a device tensor back would be a sync
        order = sorted(range(len(plan.decode_frames)), key=lambda i: int(plan.decode_frames[i]))  # stable
        if [int(plan.decode_frames[i]) for i in order] != list(range(plan.num_frames)):
            raise ValueError("path A plan must decode every real frame exactly once")
        return logits.index_select(0, long_index(order, logits.device))
    frames = long_index(plan.decode_frames, logits.device)
    if plan.path != "B":
        raise ValueError(f"unknown decode path {plan.path!r}; expected one of {list(PATHS)}")
    work_dtype = torch.promote_types(logits.dtype, torch.float32)
    values = logits.to(work_dtype)
    if average == "probs":
        values = torch.sigmoid(values)
    sums = torch.zeros((plan.num_frames,) + tuple(values.shape[1:]), dtype=work_dtype, device=logits.device)
    sums.index_add_(0, frames, values)
    counts = torch.bincount(frames, minlength=plan.num_frames).to(work_dtype)
    counts = counts.reshape((-1,) + (1,) * (values.dim() - 1))
    mean = sums / counts  # 0/0 -> NaN for uncovered frames (faithful)
    if average == "probs":
        mean = torch.logit(mean.double()).clamp(-1024.0, 1024.0).to(work_dtype)
    return mean
