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


_RLE = "an RLE dict {'size': [H, W], 'counts': str} or null"


def _check_rle(r, where: str) -> None:
    """The full check of one mask of an entry (``check_entry`` checks the usual spelling inline)."""
    from projects.sasasa2va.datasets.rle import rle_size

    if not isinstance(r, dict) or "size" not in r or "counts" not in r:
        got = f"a dict with keys {sorted(map(str, r))}" if isinstance(r, dict) else \
            f"{type(r).__name__} {r!r:.40}"
        raise ValueError(f"{where}: expected {_RLE}, got {got}")
    rle_size(r, where)
    if not isinstance(r["counts"], (str, list)):
        raise ValueError(f"{where}: RLE 'counts' must be a COCO RLE string (or a list of run lengths), got "
                         f"{type(r['counts']).__name__}")


def check_entry(entry, where: str) -> None:
    """Refuse an entry that the readers (scorer, PNG writer, viewer, averaging) cannot use, naming ``where``
    (file: video/expression) and what is expected, before any of them trips over it; everything make_entry
    writes passes (ok and failed entries, extra keys). The masks' counts are only checked when decoded."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an entry dict with 'prediction_masks' ({_RLE} per frame) and "
                         f"'frames', got {type(entry).__name__}")
    rles = entry.get("prediction_masks")
    if not isinstance(rles, list):
        got = "no such key" if "prediction_masks" not in entry else f"{type(rles).__name__} {rles!r:.40}"
        raise ValueError(f"{where}: 'prediction_masks' must be a list with {_RLE} per frame, got {got}")
    for i, r in enumerate(rles):
        size = r.get("size") if type(r) is dict else None
        if r is None or (type(size) is list and len(size) == 2 and type(size[0]) is int and type(size[1]) is int
                         and size[0] >= 0 and size[1] >= 0 and type(r.get("counts")) is str):
            continue  # (what make_entry writes, without a call per mask: results hold ~10^5 of them)
        _check_rle(r, f"{where} prediction_masks[{i}]")
    frames = entry.get("frames")
    if frames is not None and not isinstance(frames, list):
        raise ValueError(f"{where}: 'frames' must be a list of frame names (one per prediction mask), got "
                         f"{type(frames).__name__} {frames!r:.40}")


def read_results(path: str) -> tuple[dict, dict]:
    """-> (results {video: {exp: entry}} without "__" keys, meta dict or {}). Every entry passes
    ``check_entry``: the one place all readers of a results file go through."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: results file not found")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a text file ({e}); expected a results.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{video_id: {{exp_id: entry}}}}")
    meta = data.get("__meta__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: '__meta__' must be an object (split, num_videos, num_expressions, mode), got "
                         f"{type(meta).__name__}")
    results = {k: v for k, v in data.items() if not str(k).startswith("__")}
    for vid, exps in results.items():
        if not isinstance(exps, dict):
            raise ValueError(f"{path}: key {vid!r}: expected {{exp_id: entry}}, got {type(exps).__name__}")
        for eid, entry in exps.items():
            check_entry(entry, f"{path}: {vid}/{eid}")
    return results, meta


def iter_results(results: str | dict) -> Iterator[tuple[str, str, dict]]:
    """Yield (video_id, exp_id, entry) from a results.json path or a loaded dict, skipping "__" keys; entries
    of a dict are checked as read_results checks a file's."""
    checked = isinstance(results, str)
    if checked:
        results, _ = read_results(results)
    for vid, exps in results.items():
        if str(vid).startswith("__"):
            continue
        for eid, entry in exps.items():
            if not checked:
                check_entry(entry, f"{vid}/{eid}")
            yield str(vid), str(eid), entry


def entry_masks(entry: dict, height: int | None = None, width: int | None = None,
                where: str | None = None) -> np.ndarray:
    """Decode an entry's prediction_masks to bool [T,H,W]; None frames need height/width (else the first RLE
    gives the size). ``where`` (e.g. "results.json: video/exp") prefixes errors, which name the mask."""
    from projects.sasasa2va.datasets.rle import decode_rle, rle_size

    where = where or f"{entry.get('video_id')}/{entry.get('exp_id')}"
    rles = entry.get("prediction_masks") or []
    if height is None or width is None:
        sized = next(((i, r) for i, r in enumerate(rles) if r is not None), None)
        if sized is None:
            raise ValueError(f"{where}: no prediction mask gives the frame size (all {len(rles)} are null); at "
                             "least one RLE dict with 'size' [H, W] is needed")
        height, width = rle_size(sized[1], f"{where} prediction_masks[{sized[0]}]")
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack([decode_rle(r, height, width, where=f"{where} prediction_masks[{i}]")
                     for i, r in enumerate(rles)]).astype(bool)


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
