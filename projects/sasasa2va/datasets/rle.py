"""COCO run-length encoding of binary masks, in the exact form used by mask_dict.json and
results.json: pycocotools on a Fortran-ordered uint8 mask, ``counts`` stored as ``str``."""
from __future__ import annotations

import numbers
from typing import Iterable, Optional

import numpy as np
from pycocotools import mask as mask_utils

from .errors import DataError


def encode_mask(mask: np.ndarray) -> dict:
    """bool/0-1 mask [H, W] -> {"size": [H, W], "counts": str} (JSON-serialisable)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"encode_mask: expected a 2-D mask [H, W], got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool).astype(np.uint8)))
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _nonzero_sparse(flat: np.ndarray, limit: Optional[int] = None) -> Optional[np.ndarray]:
    """Sorted indices of the True values of the 1-D bool ``flat`` (its size a multiple of 8); None when more
    than ``limit`` of its 8-value words hold one (so more values than that are True). Usually sparse: looked
    for 8 values at a time (as uint64 words), then within the few words that hold one."""
    words = np.flatnonzero(flat.view(np.uint64))
    if limit is not None and len(words) > limit:
        return None
    if len(words) * 32 > flat.size:  # dense (noisy masks): one plain pass is faster
        return np.flatnonzero(flat)
    row, col = np.nonzero(flat.reshape(-1, 8)[words])
    return words[row] * 8 + col


def _column_major_changes(m: np.ndarray, limit: Optional[int] = None) -> Optional[np.ndarray]:
    """Sorted indices p of the frames' column-major pixels, frames one after another (p = t*H*W + x*H + y:
    the order pycocotools reads a Fortran-ordered mask in), where pixel p differs from pixel p - 1 of the same
    frame. Found on the C-ordered stack without transposing it (a copy that was 2/3 of the encoder's time):
    down a column (y >= 1) and from the bottom of a column to the top of the next (y = 0, x >= 1). None when
    there are more than ``limit`` of them (before sorting them)."""
    t, h, w = m.shape
    n = h * w
    parts = []
    if h > 1:
        size = t * (h - 1) * w
        buf = np.zeros(-(-size // 8) * 8, dtype=bool)  # whole uint64 words, the tail False
        np.not_equal(m[:, 1:, :], m[:, :-1, :], out=buf[:size].reshape(t, h - 1, w))
        i = _nonzero_sparse(buf, limit)
        if i is None:
            return None
        f, r = np.divmod(i, (h - 1) * w)
        y, x = np.divmod(r, w)
        parts.append(f * n + x * h + y + 1)
    if w > 1:
        i = np.flatnonzero(m[:, 0, 1:] != m[:, h - 1, :-1])
        f, x = np.divmod(i, w - 1)
        parts.append(f * n + (x + 1) * h)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    if limit is not None and sum(len(p) for p in parts) > limit:
        return None
    out = np.concatenate(parts)
    out.sort()
    return out


def encode_mask_stack(masks: np.ndarray) -> list[dict]:
    """bool/0-1 masks [T, H, W] -> one ``encode_mask`` dict per frame, the same counts strings, made with numpy
    array operations: those run without the GIL, while pycocotools' encoder holds it (~7 ms for 20 frames of
    360x640) and a host-bound model thread of the same process, e.g. launching GPU kernels, waits meanwhile
    (the evaluation's writer threads encode every output)."""
    m = np.asarray(masks)
    if m.ndim != 3:
        raise DataError(f"encode_mask_stack: expected masks [T, H, W], got shape {m.shape}")
    t, h, w = (int(v) for v in m.shape)
    n = h * w
    if t == 0:
        return []
    if n == 0:
        return [encode_mask(frame) for frame in m]
    m = np.ascontiguousarray(m if m.dtype == bool else m != 0)
    starts_at = _column_major_changes(m, limit=t * n // 16)
    if starts_at is None:  # noise-like masks (a run every few pixels): pycocotools' loop is faster
        return [encode_mask(frame) for frame in m]
    return _counts_strings(m, starts_at)


def _counts_strings(m: np.ndarray, starts_at: np.ndarray) -> list[dict]:
    """``encode_mask`` dicts of the bool stack ``m`` from its ``_column_major_changes``."""
    t, h, w = (int(v) for v in m.shape)
    n = h * w
    frame_of, run_start = np.divmod(starts_at, n)  # each new run: its frame and first pixel
    changes = np.bincount(frame_of, minlength=t)
    # counts per frame: a leading 0 when the frame starts with foreground, then each run's length
    lead = m[:, 0, 0].astype(np.int64)
    runs = changes + 1 + lead  # counts per frame
    first = np.concatenate([[0], np.cumsum(runs)[:-1]])  # index of each frame's first count
    total = int(runs.sum())
    ends = np.full(total, n, dtype=np.int64)  # each count as (its run's end) - (its run's start)
    starts = np.zeros(total, dtype=np.int64)
    slot = np.arange(len(run_start)) - np.repeat(np.concatenate([[0], np.cumsum(changes)[:-1]]), changes)
    inner = np.repeat(first + lead, changes) + slot  # the count that ends where each new run starts
    ends[inner] = run_start
    starts[inner + 1] = run_start
    if lead.any():  # the leading 0 count: start = end = 0
        ends[first[lead == 1]] = 0
    counts = ends - starts
    # COCO's string form: each count minus the count two before it (from the fourth count of a frame on),
    # in 5-bit groups, low first, 0x20 = more to come, + 48
    index = np.arange(total) - np.repeat(first, runs)
    x = counts.copy()
    later = index > 2
    x[later] -= counts[np.flatnonzero(later) - 2]
    chars, valid = [], []
    alive = np.ones(total, dtype=bool)
    while alive.any():
        c = x & 0x1F
        x = x >> 5
        more = np.where(c & 0x10, x != -1, x != 0)
        chars.append((c | (more.astype(np.int64) << 5)) + 48)
        valid.append(alive)
        alive = alive & more
    chars_2d, valid_2d = np.stack(chars, axis=1), np.stack(valid, axis=1)
    stream = chars_2d[valid_2d].astype(np.uint8).tobytes()  # row-major: each count's chars in order
    per_frame = np.bincount(np.repeat(np.arange(t), runs), weights=valid_2d.sum(axis=1), minlength=t).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(per_frame)])
    return [{"size": [h, w], "counts": stream[bounds[i]:bounds[i + 1]].decode("ascii")} for i in range(t)]


def rle_size(rle: dict, where: str = "RLE") -> tuple[int, int]:
    """(H, W) of an RLE dict; a 'size' that is not two non-negative integers is a DataError naming ``where``
    (int() on it would fail with a message that names nothing)."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in size)):
        return int(size[0]), int(size[1])
    raise DataError(f"{where}: RLE 'size' must be [H, W] (two non-negative integers), got {size!r}")


def _to_coco_rle(rle: dict, where: str) -> dict:
    """Normalise the accepted RLE spellings (str/bytes counts, uncompressed list counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataError(f"{where}: expected a COCO RLE dict with 'size' and 'counts', got {type(rle).__name__}")
    h, w = rle_size(rle, where)
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (COCO crowd annotations): let pycocotools compress it. Counts that do not cover
        # the H*W pixels would decode to whatever memory held.
        if not (all(isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in counts)
                and sum(counts) == h * w):
            raise DataError(f"{where}: uncompressed RLE 'counts' must be non-negative integers summing to "
                            f"H*W = {h * w}")
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        if not counts.isascii():
            raise DataError(f"{where}: RLE 'counts' must be an ASCII string (COCO compressed RLE)")
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise DataError(f"{where}: RLE 'counts' must be str, bytes or list, got {type(counts).__name__}")
    if not counts and h * w:  # (pycocotools would decode it to whatever memory held)
        raise DataError(f"{where}: RLE 'counts' is empty for a {h}x{w} mask")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: dict | None, height: int, width: int, where: str = "RLE") -> np.ndarray:
    """RLE (or None = object absent) -> bool [H, W]. A size that differs from (height, width) is a
    DataError rather than a silent broadcast, because it means masks and frames do not belong together.
    ``where`` is put in error messages (file / key)."""
    if rle is None:
        return np.zeros((int(height), int(width)), dtype=bool)
    coco = _to_coco_rle(rle, where)
    if [int(coco["size"][0]), int(coco["size"][1])] != [int(height), int(width)]:
        raise DataError(
            f"{where}: mask size {list(coco['size'])} does not match the frame size [{height}, {width}] (H, W)"
        )
    try:
        m = mask_utils.decode(coco)
    except Exception as exc:  # pycocotools raises bare Exceptions on corrupt counts
        raise DataError(f"{where}: cannot decode RLE counts ({exc})") from exc
    return m.astype(bool)


def rle_area(rle: dict | None) -> int:
    """Foreground pixel count without decoding (0 for None)."""
    if rle is None:
        return 0
    return int(mask_utils.area(_to_coco_rle(rle, "RLE")))


def merge_masks(masks: Iterable[np.ndarray]) -> np.ndarray:
    """OR of equally shaped masks (an expression's mask is the union of its objects)."""
    out = None
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if out is None:
            out = m.copy()
        else:
            if m.shape != out.shape:
                raise DataError(f"merge_masks: shape {m.shape} differs from {out.shape}")
            out |= m
    if out is None:
        raise DataError("merge_masks: no masks given")
    return out
