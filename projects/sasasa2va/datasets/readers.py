"""Readers for the Ref-VOS / Ref-Seg data layouts (spec model_training §5, evaluation §6.1).

Every reader validates what it reads and raises ``DataError`` naming the file, the key and what was
expected: the reference prints and skips bad samples, which hides broken data for a whole run.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import DataError
from .records import Expression, VideoRecord
from .rle import decode_rle

logger = logging.getLogger(__name__)

__all__ = [
    "MaskDict",
    "RefImage",
    "RefInstance",
    "RefSAVRecord",
    "annotation_mask",
    "check_frame_files",
    "check_same_frame_size",
    "decode_masklet",
    "decode_video_frames",
    "empty_expression_error",
    "expression_masks",
    "frame_size",
    "list_frames",
    "load_frame",
    "load_json",
    "load_mask_dict",
    "load_refsav_sample",
    "read_meta_expressions",
    "read_refcoco",
    "read_refsav",
    "read_refytvos",
    "read_selected_frames",
    "record_from_folder",
    "safe_pickle_load",
    "sam2_path_patch",
]


# --------------------------------------------------------------------------------------------------
# generic file helpers
# --------------------------------------------------------------------------------------------------
def load_json(path: str) -> Any:
    """json.load with errors that name the file (missing / not JSON)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


_SAFE_GLOBALS = {
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("builtins", "range"),
    ("collections", "OrderedDict"),
    # Protocol <= 2 writes bytes as _codecs.encode(str, "latin1"); a pure codec call, runs no code.
    ("_codecs", "encode"),
    # Python-2 pickles name the builtins module differently.
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("__builtin__", "bytearray"),
    ("__builtin__", "complex"),
    ("__builtin__", "slice"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only builtin containers/scalars: a data pickle has no business naming code."""

    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) in _SAFE_GLOBALS:
            if module == "__builtin__":
                module = "builtins"
            return super().find_class(module, name)
        raise DataError(
            f"{self._path}: pickle references {module}.{name}; only builtin containers and scalars are "
            "allowed (refusing to load a pickle that could run code)"
        )


def safe_pickle_load(path: str, encoding: str = "ASCII") -> Any:
    """Load a data pickle (mask_dict.pkl, refs(unc).p) with a restricted unpickler.

    Plain dicts/lists/str/int/float/bytes/None/bool need no globals; set/frozenset/OrderedDict are
    allowed; anything else (os.system, numpy, ...) raises DataError naming the file and the global.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), path, encoding).load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# meta_expressions.json (MeViS, ReVOS, Ref-YouTube-VOS)
# --------------------------------------------------------------------------------------------------
def _as_int_list(value: Any, path: str, key: str) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bool):
            raise DataError(f"{path}: {key} must hold integers, got {v!r}")
        try:
            out.append(int(v))
        except (TypeError, ValueError):
            raise DataError(f"{path}: {key} must hold integers, got {v!r}") from None
    return out


def _as_str_list(value: Any, path: str, key: str) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DataError(f"{path}: {key} must hold ints or strings, got {v!r}")
        out.append(str(v))
    return out


def _sorted_frames(frames: Any, path: str, vid: str) -> list[str]:
    """Frames are sorted (reference behaviour); warn when the stored order differs (spec Q11),
    because GT indexed by the stored order would then be misaligned."""
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{path}: videos[{vid!r}].frames must be a non-empty list of frame names")
    names = []
    for f in frames:
        if not isinstance(f, str) or not f.strip():
            raise DataError(f"{path}: videos[{vid!r}].frames holds {f!r}; expected non-empty strings")
        names.append(f)
    if len(set(names)) != len(names):
        raise DataError(f"{path}: videos[{vid!r}].frames has duplicate names")
    ordered = sorted(names)
    if ordered != names:
        logger.warning(
            "%s: videos[%r].frames are not in sorted order; using the sorted order (masks are indexed by "
            "the sorted list)", path, vid
        )
    return ordered


def read_meta_expressions(
    meta_path: str,
    image_folder: str,
    *,
    require_anno_id: bool = False,
    check_frames: bool = False,
    allow_empty_text: bool = False,
) -> dict[str, VideoRecord]:
    """meta_expressions.json -> {video_id: VideoRecord}, videos in JSON order, frames sorted,
    expression ids sorted as strings.

    ``require_anno_id``: training/valid_u splits must say which masks belong to each expression
    (MeViS valid has no anno_id, so it is optional by default). ``check_frames``: stat every frame file.
    ``allow_empty_text``: keep an empty or whitespace-only ``exp`` string (with a warning naming the file
    and key) instead of raising; evaluation uses this to record that one expression as failed and go on
    (see ``empty_expression_error``). A missing or non-string ``exp`` is always an error.
    """
    data = load_json(meta_path)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        raise DataError(f"{meta_path}: expected a top-level object with a 'videos' object")
    records: dict[str, VideoRecord] = {}
    for vid, entry in data["videos"].items():
        if not isinstance(entry, dict):
            raise DataError(f"{meta_path}: videos[{vid!r}] must be an object with 'frames' and 'expressions'")
        if "frames" not in entry:
            raise DataError(f"{meta_path}: videos[{vid!r}] has no 'frames' list")
        if not isinstance(entry.get("expressions"), dict):
            raise DataError(f"{meta_path}: videos[{vid!r}] has no 'expressions' object")
        frames = _sorted_frames(entry["frames"], meta_path, vid)
        expressions: dict[str, Expression] = {}
        for exp_id in sorted(entry["expressions"].keys()):
            e = entry["expressions"][exp_id]
            key = f"videos[{vid!r}].expressions[{exp_id!r}]"
            if not isinstance(e, dict):
                raise DataError(f"{meta_path}: {key} must be an object with 'exp'")
            text = e.get("exp")
            if not isinstance(text, str) or not text.strip():
                if not (allow_empty_text and isinstance(text, str)):
                    raise DataError(f"{meta_path}: {key}.exp must be a non-empty string, got {text!r}")
                logger.warning("%s", empty_expression_error(meta_path, vid, exp_id, text))
            obj_ids = _as_int_list(e["obj_id"], meta_path, f"{key}.obj_id") if "obj_id" in e else []
            if "anno_id" in e:
                anno_ids = _as_str_list(e["anno_id"], meta_path, f"{key}.anno_id")
            elif require_anno_id:
                raise DataError(f"{meta_path}: {key} has no 'anno_id' (needed to find its masks)")
            else:
                anno_ids = []
            expressions[exp_id] = Expression(exp_id=exp_id, text=text, obj_ids=obj_ids, anno_ids=anno_ids)
        rec = VideoRecord(
            video_id=vid, frame_names=frames, frame_dir=os.path.join(image_folder, vid), expressions=expressions
        )
        if check_frames:
            check_frame_files(rec)
        records[vid] = rec
    return records


def empty_expression_error(meta_path: str, video_id: str, exp_id: str, text: str) -> str:
    """The message for an empty/whitespace expression (reader warning and evaluation failure reason)."""
    return (f"{meta_path}: videos[{video_id!r}].expressions[{exp_id!r}].exp is empty or whitespace ({text!r}); "
            "nothing to segment")


# --------------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------------
def list_frames(folder: str, ext: str = ".jpg") -> list[str]:
    """Sorted frame stems of a folder of images (for videos given as a bare folder, e.g. a demo)."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: frame folder not found")
    names = sorted(f[: -len(ext)] for f in os.listdir(folder) if f.lower().endswith(ext) and not f.startswith("."))
    if not names:
        raise DataError(f"{folder}: no *{ext} frames found")
    return names


def record_from_folder(folder: str, video_id: str | None = None) -> VideoRecord:
    """A VideoRecord (no expressions) for a folder of .jpg frames."""
    folder = os.path.normpath(folder)
    return VideoRecord(video_id=video_id or os.path.basename(folder), frame_names=list_frames(folder),
                       frame_dir=folder, expressions={})


def check_frame_files(record: VideoRecord, decode: bool = False) -> None:
    """Raise DataError naming the first missing (or, with ``decode``, unreadable) frame file."""
    if not os.path.isdir(record.frame_dir):
        raise DataError(f"{record.frame_dir}: frame folder of video {record.video_id!r} not found")
    missing = [record.frame_path(i) for i in range(record.num_frames) if not os.path.isfile(record.frame_path(i))]
    if missing:
        raise DataError(
            f"{missing[0]}: frame file not found (video {record.video_id!r}; {len(missing)} of "
            f"{record.num_frames} frames missing)"
        )
    if decode:
        for i in range(record.num_frames):
            load_frame(record, i)


def _open_image(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode, so truncated files fail here
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def load_frame(record: VideoRecord, i: int) -> Image.Image:
    """Fully decoded RGB PIL image of frame i; a missing, truncated or corrupt file is a DataError."""
    if not 0 <= i < record.num_frames:
        raise DataError(f"video {record.video_id!r}: frame index {i} out of range [0, {record.num_frames})")
    return _open_image(record.frame_path(i))


def check_same_frame_size(record: VideoRecord, frames: Sequence[Image.Image],
                          indices: Sequence[int] | None = None) -> None:
    """DataError naming the first frame file whose size differs from the first one (frames[k] is frame
    ``indices[k]`` of the video, default 0..n-1): masks, grids and SAM2 inputs assume one size per video."""
    idx = list(range(len(frames))) if indices is None else [int(i) for i in indices]
    if len(idx) != len(frames):
        raise ValueError(f"check_same_frame_size: {len(frames)} frames for {len(idx)} indices")
    if not frames:
        return
    w0, h0 = frames[0].size
    for i, im in zip(idx, frames):
        if im.size != (w0, h0):
            raise DataError(
                f"{record.frame_path(i)}: frame size {im.size[0]}x{im.size[1]} (WxH) differs from "
                f"{w0}x{h0} of {record.frame_path(idx[0])} in video {record.video_id!r}; every frame of a video "
                "must have the same size")


def frame_size(record: VideoRecord, i: int = 0) -> tuple[int, int]:
    """(H, W) of frame i from the file header only (cheap)."""
    path = record.frame_path(i)
    if not os.path.isfile(path):
        raise DataError(f"{path}: frame file not found (video {record.video_id!r})")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:
        raise DataError(f"{path}: cannot read image header ({type(exc).__name__}: {exc})") from exc
    return int(h), int(w)


# --------------------------------------------------------------------------------------------------
# mask_dict
# --------------------------------------------------------------------------------------------------
class MaskDict(dict):
    """{anno_id (str): [per-frame RLE or None]} that remembers its file, for error messages."""

    source: str = "<mask_dict>"


def load_mask_dict(path: str) -> dict[str, list[dict | None]]:
    """mask_dict.json, or mask_dict.pkl via the restricted unpickler. Keys become strings."""
    raw = safe_pickle_load(path) if path.endswith((".pkl", ".p", ".pickle")) else load_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{anno_id: [per-frame RLE or null]}}, got {type(raw).__name__}")
    out = MaskDict()
    out.source = path
    for k, v in raw.items():
        if not isinstance(v, list):
            raise DataError(f"{path}: key {str(k)!r} must map to a list of per-frame RLEs, got {type(v).__name__}")
        out[str(k)] = v
    return out


def _frame_entry_mask(entry: Any, h: int, w: int, where: str) -> np.ndarray:
    """One frame of one anno_id: None, an RLE, or a list of RLEs (OR-ed, reference 'sum over last axis')."""
    if isinstance(entry, list):
        m = np.zeros((h, w), dtype=bool)
        for j, r in enumerate(entry):
            m |= decode_rle(r, h, w, where=f"{where}[{j}]")
        return m
    return decode_rle(entry, h, w, where=where)


def expression_masks(
    record: VideoRecord,
    exp_id: str,
    mask_dict: dict,
    frame_indices: Sequence[int] | None = None,
    frame_size_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """bool [T, H, W]: OR over the expression's anno_ids on the requested frames (all by default).

    A null entry is an absent object (zeros). ``frame_size_hw`` defaults to the header of frame 0, so
    a mask whose size does not match the frames is caught here instead of deep in a loss.
    """
    src = getattr(mask_dict, "source", "<mask_dict>")
    if exp_id not in record.expressions:
        raise DataError(f"video {record.video_id!r}: no expression {exp_id!r}")
    exp = record.expressions[exp_id]
    idx = list(range(record.num_frames)) if frame_indices is None else [int(i) for i in frame_indices]
    for i in idx:
        if not 0 <= i < record.num_frames:
            raise DataError(f"video {record.video_id!r}: frame index {i} out of range [0, {record.num_frames})")
    h, w = frame_size_hw if frame_size_hw is not None else frame_size(record)
    out = np.zeros((len(idx), h, w), dtype=bool)
    for anno in exp.anno_ids:
        if anno not in mask_dict:
            raise DataError(
                f"{src}: missing key {anno!r} (anno_id of video {record.video_id!r} expression {exp_id!r}); "
                "expected a per-frame RLE list"
            )
        per_frame = mask_dict[anno]
        if len(per_frame) != record.num_frames:
            raise DataError(
                f"{src}: key {anno!r} has {len(per_frame)} frame entries; video {record.video_id!r} has "
                f"{record.num_frames} frames"
            )
        for t, i in enumerate(idx):
            out[t] |= _frame_entry_mask(per_frame[i], h, w, f"{src}: key {anno!r} frame {i}")
    return out


# --------------------------------------------------------------------------------------------------
# Ref-YouTube-VOS
# --------------------------------------------------------------------------------------------------
def read_refytvos(
    meta_path: str, image_folder: str, mask_pkl: str
) -> tuple[dict[str, VideoRecord], dict[str, list]]:
    """Ref-YouTube-VOS: expressions have no anno_id; their masks are keyed by the global running
    expression counter (videos in JSON order, exp ids sorted as strings). Returns (records, mask_dict);
    every counter key must exist in the pickle."""
    records = read_meta_expressions(meta_path, image_folder)
    mask_dict = load_mask_dict(mask_pkl)
    k = 0
    for rec in records.values():
        for exp in rec.expressions.values():
            key = str(k)
            if key not in mask_dict:
                raise DataError(
                    f"{mask_pkl}: missing key {key!r} (running counter of video {rec.video_id!r} expression "
                    f"{exp.exp_id!r} in {meta_path})"
                )
            exp.anno_ids = [key]
            k += 1
    return records, mask_dict


# --------------------------------------------------------------------------------------------------
# Q-frame selected_frames.json
# --------------------------------------------------------------------------------------------------
def read_selected_frames(
    path: str, records: dict[str, VideoRecord], num_samples: int = 100
) -> dict[str, dict[str, list[int]]]:
    """selected_frames.json -> {video_id: {exp_id: [num_samples ints]}} for exactly the given records.

    Every video/expression of the split must be present, each list must have exactly ``num_samples``
    integers in [0, L). Unsorted lists are accepted (the file is 'pre-sorted' by convention) but warned
    about, since they scramble clip order.
    """
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object {{video_id: {{'selected_frames': {{exp_id: [ints]}}}}}}")
    out: dict[str, dict[str, list[int]]] = {}
    for vid, rec in records.items():
        if vid not in data:
            raise DataError(f"{path}: missing video {vid!r} (every video of the split must be present)")
        entry = data[vid]
        if not isinstance(entry, dict) or not isinstance(entry.get("selected_frames"), dict):
            raise DataError(f"{path}: [{vid!r}] must be an object with a 'selected_frames' object")
        sel = entry["selected_frames"]
        out[vid] = {}
        for exp_id in rec.expressions:
            key = f"[{vid!r}].selected_frames[{exp_id!r}]"
            if exp_id not in sel:
                raise DataError(f"{path}: missing {key} (every expression of the split must be present)")
            lst = sel[exp_id]
            if not isinstance(lst, list) or len(lst) != num_samples:
                n = len(lst) if isinstance(lst, list) else type(lst).__name__
                raise DataError(f"{path}: {key} must be a list of exactly {num_samples} frame indices, got {n}")
            for v in lst:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise DataError(f"{path}: {key} holds {v!r}; expected integers")
                if not 0 <= v < rec.num_frames:
                    raise DataError(
                        f"{path}: {key} holds index {v} out of range [0, {rec.num_frames}) for video {vid!r}"
                    )
            if any(a > b for a, b in zip(lst, lst[1:])):
                logger.warning("%s: %s is not sorted ascending; clip order follows the file", path, key)
            out[vid][exp_id] = list(lst)
    return out


# --------------------------------------------------------------------------------------------------
# Ref-SAV
# --------------------------------------------------------------------------------------------------
@dataclass
class RefSAVRecord:
    """One Ref-SAV entry: absolute mp4/annotation paths and {obj_idx (str): expression}."""

    key: str
    video_path: str
    anno_path: str
    objects: dict[str, str] = field(default_factory=dict)


def sam2_path_patch(path: str) -> str:
    """Undo the duplicated shard folder of some Ref-SAV paths: '.../sav_000/sav_train/sav_000/...'
    -> '.../sav_train/sav_000/...' (the earlier duplicate is removed)."""
    parts = path.split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "sav_train" and parts[i - 1] == parts[i + 1]:
            return "/".join(parts[: i - 1] + parts[i:])
    return path


def read_refsav(json_path: str, video_root: str) -> list[RefSAVRecord]:
    """Ref-SAV.json -> records (JSON order); paths are joined to ``video_root`` after sam2_path_patch."""
    data = load_json(json_path)
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected an object {{key: {{video_path, anno_path, objects}}}}")
    out = []
    for key, e in data.items():
        if not isinstance(e, dict):
            raise DataError(f"{json_path}: [{key!r}] must be an object")
        for f in ("video_path", "anno_path"):
            if not isinstance(e.get(f), str) or not e[f]:
                raise DataError(f"{json_path}: [{key!r}].{f} must be a non-empty string")
        objs = e.get("objects")
        if not isinstance(objs, dict) or not objs:
            raise DataError(f"{json_path}: [{key!r}].objects must be a non-empty object {{obj_idx: {{formated}}}}")
        objects = {}
        for oid, o in objs.items():
            text = o.get("formated") if isinstance(o, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{json_path}: [{key!r}].objects[{oid!r}].formated must be a non-empty string")
            try:
                int(oid)
            except ValueError:
                raise DataError(f"{json_path}: [{key!r}].objects key {oid!r} must be an integer channel index") from None
            objects[str(oid)] = text
        out.append(
            RefSAVRecord(
                key=str(key),
                video_path=os.path.join(video_root, sam2_path_patch(e["video_path"])),
                anno_path=os.path.join(video_root, sam2_path_patch(e["anno_path"])),
                objects=objects,
            )
        )
    return out


def decode_video_frames(path: str, step: int = 4) -> list[np.ndarray]:
    """Decode an mp4 with OpenCV and keep every ``step``-th frame (SA-V: 24 fps -> 6 fps), as RGB uint8."""
    import cv2

    if not os.path.isfile(path):
        raise DataError(f"{path}: video file not found")
    cap = cv2.VideoCapture(path)
    frames = []
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % step == 0:
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            i += 1
    finally:
        cap.release()
    if not frames:
        raise DataError(f"{path}: no frames could be decoded")
    return frames


def decode_masklet(anno_path: str) -> list[list[dict]]:
    """The SA-V annotation's 'masklet': per annotated frame, a list of per-object RLEs."""
    data = load_json(anno_path)
    masklet = data.get("masklet") if isinstance(data, dict) else None
    if not isinstance(masklet, list) or not masklet:
        raise DataError(f"{anno_path}: expected a non-empty 'masklet' list (per frame, per-object RLEs)")
    for t, per_obj in enumerate(masklet):
        if not isinstance(per_obj, list):
            raise DataError(f"{anno_path}: masklet[{t}] must be a list of per-object RLEs")
    return masklet


def load_refsav_sample(
    record: RefSAVRecord, obj_ids: Iterable[str] | None = None, step: int = 4
) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """(kept RGB frames, {obj_id: bool [K, H, W]}); the masklet count must equal the kept frames and
    object obj_id is channel int(obj_id)."""
    frames = decode_video_frames(record.video_path, step=step)
    masklet = decode_masklet(record.anno_path)
    if len(masklet) != len(frames):
        raise DataError(
            f"{record.anno_path}: masklet has {len(masklet)} frames but {record.video_path} has {len(frames)} "
            f"frames after keeping every {step}th"
        )
    h, w = frames[0].shape[:2]
    ids = list(record.objects) if obj_ids is None else [str(o) for o in obj_ids]
    masks = {}
    for oid in ids:
        c = int(oid)
        m = np.zeros((len(masklet), h, w), dtype=bool)
        for t, per_obj in enumerate(masklet):
            if not 0 <= c < len(per_obj):
                raise DataError(
                    f"{record.anno_path}: masklet[{t}] has {len(per_obj)} objects; object {oid!r} of entry "
                    f"{record.key!r} needs channel {c}"
                )
            m[t] = decode_rle(per_obj[c], h, w, where=f"{record.anno_path}: masklet[{t}][{c}]")
        masks[oid] = m
    return frames, masks


# --------------------------------------------------------------------------------------------------
# RefCOCO / RefCOCO+ / RefCOCOg
# --------------------------------------------------------------------------------------------------
@dataclass
class RefInstance:
    """One referred object: its COCO annotation segmentation and the raw sentences."""

    ref_id: int
    ann_id: int
    category_id: int
    sentences: list[str]
    segmentation: Any


@dataclass
class RefImage:
    """One image and all refs of the chosen split on it (one training sample = one image)."""

    image_id: int
    image_path: str
    height: int
    width: int
    instances: list[RefInstance] = field(default_factory=list)


def annotation_mask(segmentation: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> bool [H, W]. Polygons are
    rasterised one by one and added (reference behaviour), then binarised."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            raise DataError(f"{where}: empty polygon list")
        canvas = np.zeros((height, width), dtype=np.uint8)
        for j, poly in enumerate(segmentation):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                raise DataError(f"{where}: polygon {j} must be a flat list of >= 3 (x, y) pairs")
            rles = mask_utils.frPyObjects([poly], height, width)
            canvas += mask_utils.decode(rles).sum(axis=2).astype(np.uint8)
        return canvas > 0
    if isinstance(segmentation, dict):
        return decode_rle(segmentation, height, width, where=where)
    raise DataError(f"{where}: expected a polygon list or an RLE dict, got {type(segmentation).__name__}")


def read_refcoco(data_root: str, refs_file: str, split: str = "train") -> list[RefImage]:
    """instances.json + refs pickle -> images (sorted by image id) with the refs of ``split``.
    ``refs_file`` is a name inside ``data_root`` (e.g. 'refs(unc).p') or a path."""
    inst_path = os.path.join(data_root, "instances.json")
    refs_path = refs_file if os.path.isabs(refs_file) else os.path.join(data_root, refs_file)
    inst = load_json(inst_path)
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) or not isinstance(inst.get("annotations"), list):
        raise DataError(f"{inst_path}: expected COCO instances with 'images' and 'annotations' lists")
    images = {}
    for im in inst["images"]:
        try:
            images[int(im["id"])] = (str(im["file_name"]), int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{inst_path}: image entry {im!r} needs id, file_name, height, width") from exc
    anns = {}
    for a in inst["annotations"]:
        if not isinstance(a, dict) or "id" not in a or "segmentation" not in a or "image_id" not in a:
            raise DataError(f"{inst_path}: annotation entry needs id, image_id, segmentation")
        anns[int(a["id"])] = a
    refs = safe_pickle_load(refs_path)
    if not isinstance(refs, list):
        raise DataError(f"{refs_path}: expected a list of ref records")
    by_image: dict[int, RefImage] = {}
    for r in refs:
        if not isinstance(r, dict) or any(k not in r for k in ("ann_id", "image_id", "split", "sentences")):
            raise DataError(f"{refs_path}: ref record needs ann_id, image_id, split, sentences; got {r!r}"[:300])
        if r["split"] != split:
            continue
        rid = r.get("ref_id", -1)
        ann_id, image_id = int(r["ann_id"]), int(r["image_id"])
        if ann_id not in anns:
            raise DataError(f"{refs_path}: ref {rid} names ann_id {ann_id}, which is not in {inst_path}")
        if image_id not in images:
            raise DataError(f"{refs_path}: ref {rid} names image_id {image_id}, which is not in {inst_path}")
        sents = []
        for s in r["sentences"]:
            text = s.get("raw", s.get("sent")) if isinstance(s, dict) else s
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{refs_path}: ref {rid} has an empty sentence {s!r}")
            sents.append(text)
        if not sents:
            raise DataError(f"{refs_path}: ref {rid} has no sentences")
        if image_id not in by_image:
            fn, h, w = images[image_id]
            by_image[image_id] = RefImage(
                image_id=image_id,
                image_path=os.path.join(data_root, "coco2014", "train2014", fn),
                height=h,
                width=w,
            )
        a = anns[ann_id]
        by_image[image_id].instances.append(
            RefInstance(
                ref_id=int(rid),
                ann_id=ann_id,
                category_id=int(a.get("category_id", r.get("category_id", 0))),
                sentences=sents,
                segmentation=a["segmentation"],
            )
        )
    return [by_image[k] for k in sorted(by_image)]
