"""results.json helpers (DESIGN.md "results.json", spec evaluation.md §4.4), shared by the evaluation
runner, the ensembler and the submission writer so every producer writes the same format."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

import numpy as np

from projects.sasasa2va.utils.io import atomic_write_json


def encode_masks(masks) -> list[dict]:
    """Bool [T,H,W] (or a list of [H,W] arrays / RLE dicts) -> list of RLE dicts. An array is encoded by
    ``encode_mask_stack`` (numpy, without holding the GIL: the runner's writer threads call this beside the
    model's thread)."""
    from projects.sasasa2va.datasets.rle import encode_mask, encode_mask_stack

    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        return encode_mask_stack(masks)
    out = []
    for m in masks:
        if isinstance(m, dict):
            if "size" not in m or "counts" not in m:
                raise ValueError(f"RLE dict must have 'size' and 'counts', got keys {sorted(m)}")
            out.append(m)
        else:
            out.append(encode_mask(np.asarray(m) != 0))
    return out


def make_entry(index: int, video_id: str, exp_id: str, frames: list[str], masks,
               text_prediction: str = "", exp: str = "", status: str = "ok",
               error: str | None = None) -> dict:
    """One results.json entry; masks (bool [T,H,W] or per-frame RLEs) must match the frame list."""
    rles = encode_masks(masks)
    if len(rles) != len(frames):
        raise ValueError(f"{video_id}/{exp_id}: {len(rles)} masks for {len(frames)} frames")
    if status not in ("ok", "failed"):
        raise ValueError(f"{video_id}/{exp_id}: status must be 'ok' or 'failed', got {status!r}")
    return {"index": int(index), "video_id": str(video_id), "exp_id": str(exp_id),
            "text_prediction": text_prediction, "frames": [str(f) for f in frames], "exp": exp,
            "prediction_masks": rles, "status": status, "error": error}


def read_entry(path: str, video_id: str, exp_id: str, num_frames: int) -> dict | None:
    """The per-expression entry stored at ``path`` (written by make_entry + atomic_write_json), or None
    when absent, unreadable, or not this expression's with one mask per frame (then it is recomputed)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            e = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(e, dict) or e.get("video_id") != video_id or e.get("exp_id") != exp_id
            or len(e.get("prediction_masks") or []) != num_frames):
        return None
    return e


def nest_entries(entries: Iterable[dict]) -> dict:
    """{video: {exp: entry}} in arrival order; a duplicate (video, exp) is an error (spec §4.4)."""
    out: dict[str, dict[str, dict]] = {}
    for e in entries:
        vid, eid = str(e["video_id"]), str(e["exp_id"])
        per_video = out.setdefault(vid, {})
        if eid in per_video:
            raise ValueError(f"duplicate results entry for video {vid!r} expression {eid!r}")
        per_video[eid] = e
    return out


def write_results(path: str, entries: Iterable[dict], meta: dict | None = None) -> dict:
    """Write results.json atomically with a "__meta__" entry and return the written object.

    meta should carry the split's own num_videos / num_expressions (spec §11.4); when absent they
    default to the counts of the entries written.
    """
    nested = nest_entries(entries)
    m = dict(meta or {})
    m.setdefault("num_videos", len(nested))
    m.setdefault("num_expressions", sum(len(v) for v in nested.values()))
    obj: dict[str, Any] = {"__meta__": m}
    obj.update(nested)
    atomic_write_json(path, obj)
    return obj


def read_results(path: str) -> tuple[dict, dict]:
    """-> (results {video: {exp: entry}} without "__" keys, meta dict or {})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: results file not found")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{video_id: {{exp_id: entry}}}}")
    meta = data.get("__meta__") or {}
    results = {k: v for k, v in data.items() if not str(k).startswith("__")}
    for vid, exps in results.items():
        if not isinstance(exps, dict):
            raise ValueError(f"{path}: key {vid!r}: expected {{exp_id: entry}}, got {type(exps).__name__}")
    return results, meta


def iter_results(results: str | dict) -> Iterator[tuple[str, str, dict]]:
    """Yield (video_id, exp_id, entry) from a results.json path or a loaded dict, skipping "__" keys."""
    if isinstance(results, str):
        results, _ = read_results(results)
    for vid, exps in results.items():
        if str(vid).startswith("__"):
            continue
        for eid, entry in exps.items():
            yield str(vid), str(eid), entry


def entry_masks(entry: dict, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode an entry's prediction_masks to bool [T,H,W]; None frames need height/width."""
    from projects.sasasa2va.datasets.rle import decode_rle

    rles = entry.get("prediction_masks") or []
    if height is None or width is None:
        sized = next((r for r in rles if r is not None), None)
        if sized is None:
            raise ValueError(f"{entry.get('video_id')}/{entry.get('exp_id')}: no mask gives the frame "
                             "size; pass height and width")
        height, width = int(sized["size"][0]), int(sized["size"][1])
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([decode_rle(r, height, width) for r in rles]).astype(bool)


def not_in_split(pairs, records: dict) -> list[tuple[str, str]]:
    """The (video, expression) pairs that the split's records lack, in the given order: the sign of
    predictions made on another split (what every reader of results checks before using them)."""
    return [(v, e) for v, e in pairs if v not in records or e not in records[v].expressions]


def check_results_in_split(results: dict, records: dict, results_path: str, meta_path: str) -> None:
    """Refuse results ({video: {exp: entry}}) holding expressions the split's records lack: results made on
    another split (scoring or showing them against this one would be meaningless)."""
    foreign = [f"{v}/{e}" for v, e in not_in_split(((v, e) for v, es in results.items() for e in es), records)]
    if foreign:
        raise ValueError(f"{results_path}: {len(foreign)} prediction(s) for expressions that {meta_path} does not "
                         f"have (first: {', '.join(foreign[:5])}); were these results made on another split?")
