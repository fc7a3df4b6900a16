"""COCO run-length encoding of binary masks, in the exact form used by mask_dict.json and
results.json: pycocotools on a Fortran-ordered uint8 mask, ``counts`` stored as ``str``."""
from __future__ import annotations

from typing import Iterable

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


def _to_coco_rle(rle: dict, where: str) -> dict:
    """Normalise the accepted RLE spellings (str/bytes counts, uncompressed list counts)."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataError(f"{where}: expected a COCO RLE dict with 'size' and 'counts', got {type(rle).__name__}")
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise DataError(f"{where}: RLE 'size' must be [H, W], got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, list):
        # Uncompressed RLE (COCO crowd annotations): let pycocotools compress it.
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise DataError(f"{where}: RLE 'counts' must be str, bytes or list, got {type(counts).__name__}")
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
