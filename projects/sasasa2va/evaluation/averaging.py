"""Selective averaging (spec evaluation.md §3.3, decision §11.3).

Each inference run (one mode, possibly one model size) stores per-frame mask probabilities in
``<run_dir>/probs/<video_id>/<exp_id>.npz`` (uint8 ``probs`` [T,H,W] = round(255*sigmoid)). An ensemble
is the weighted per-pixel mean of the selected runs' probabilities thresholded at 0.5 (binary-mask
voting is the option). "Selective" = the member set, picked by greedy forward selection on a split
with ground truth and then applied unchanged to other splits.
"""
from __future__ import annotations

import io
import os
import zipfile
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np

from projects.sasasa2va.utils.io import atomic_write_bytes
from projects.sasasa2va.utils.progress import counted, progress_bar

# Same names and order as projects.sasasa2va.hf.models.frame_sampling.MODES (the default member set).
MODES = ("uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus")
VOTING = ("probs", "binary")
_CHUNK = 32  # frames scored at a time, to bound memory on long high-resolution videos
_TIE = 1e-12
PROBS_COMPRESSLEVEL = 1  # zlib level of the stored probabilities (see save_probs)


# ----------------------------------------------------------------------------- probability store
def probs_path(run_dir: str, video_id: str, exp_id: str) -> str:
    return os.path.join(run_dir, "probs", str(video_id), f"{exp_id}.npz")


def quantize_probs(probs: np.ndarray) -> np.ndarray:
    """Float probabilities in [0,1] -> uint8 round(255*p) in float32 (NaN -> 0, out of range clipped);
    uint8 input is kept as is. One float32 buffer, NaNs looked for once: ~7x faster than
    nan_to_num + rint + clip on fresh arrays (every prediction goes through here), same bytes."""
    p = np.asarray(probs)
    if p.dtype == np.uint8:
        return p
    if p.dtype == bool:
        return p.astype(np.uint8) * 255
    with np.errstate(over="ignore"):  # huge values become inf, clipped to 255 below
        q = np.multiply(p, np.float32(255.0), dtype=np.float32)
    nan = np.isnan(q)
    if nan.any():
        q[nan] = 0.0
    np.rint(q, out=q)
    np.clip(q, 0, 255, out=q)
    return q.astype(np.uint8)


def encode_probs(probs: np.ndarray) -> bytes:
    """The .npz bytes that ``save_probs`` stores for ``probs`` ([T,H,W], float in [0,1] or uint8):
    uint8, deflated at level 1 (np.savez_compressed uses 6: ~4.5x slower for ~1.6x smaller files on
    noisy probabilities; mostly-empty masks compress well either way)."""
    q = quantize_probs(probs)
    if q.ndim != 3:
        raise ValueError(f"probs must be [T,H,W], got shape {q.shape}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=PROBS_COMPRESSLEVEL) as z:
        with z.open("probs.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, q, allow_pickle=False)
    return buf.getvalue()


def save_probs(run_dir: str, video_id: str, exp_id: str, probs: np.ndarray, encoded: bytes | None = None) -> str:
    """Store one expression's probabilities atomically (``encode_probs``; ``encoded``: its bytes, when
    already made for an output shared with another run)."""
    if encoded is None:
        try:
            encoded = encode_probs(probs)
        except ValueError as err:
            raise ValueError(f"{video_id}/{exp_id}: {err}") from None
    path = probs_path(run_dir, video_id, exp_id)
    atomic_write_bytes(path, encoded)
    return path


def load_probs(run_dir: str, video_id: str, exp_id: str) -> np.ndarray:
    """uint8 [T,H,W]; FileNotFoundError naming the file when the run lacks the expression, ValueError naming it
    when it is not what save_probs writes. numpy's own message for pickled data suggests unpickling the
    file: never passed on (an evaluation folder may come from anywhere)."""
    path = probs_path(run_dir, video_id, exp_id)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no stored probabilities for {video_id}/{exp_id}")
    redo = f"delete the file and rerun the evaluation to recompute {video_id}/{exp_id}"
    foreign = (f"{path}: not a probability file written by this project (expected an .npz holding a uint8 array "
               f"'probs' [T,H,W]")
    unreadable = (zipfile.BadZipFile, EOFError, OSError, zlib.error)
    try:
        z = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise ValueError(f"{path}: unreadable probabilities ({type(exc).__name__}: {exc}); {redo}") from None
    except ValueError:  # neither a zip nor an .npy array: numpy took it for a pickle
        raise ValueError(f"{foreign}); {redo}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{foreign}, got a bare .npy array); {redo}")
    with z:
        if "probs" not in z.files:
            raise ValueError(f"{path}: missing array 'probs' (found {z.files})")
        try:
            p = z["probs"]
        except unreadable as exc:
            raise ValueError(f"{path}: unreadable probabilities ({type(exc).__name__}: {exc}); {redo}") from None
        except ValueError as exc:
            why = "holds Python objects, never unpickled (allow_pickle=False)" if "allow_pickle" in str(exc) \
                else "has a broken array header"
            raise ValueError(f"{foreign}; its 'probs' {why}); {redo}") from None
    if p.dtype != np.uint8 or p.ndim != 3:
        raise ValueError(f"{path}: 'probs' must be uint8 [T,H,W], got {p.dtype} {p.shape}")
    return p


def list_probs(run_dir: str) -> list[tuple[str, str]]:
    """(video_id, exp_id) pairs stored in a run, sorted; temp files of interrupted writes ignored."""
    root = os.path.join(run_dir, "probs")
    out = []
    if not os.path.isdir(root):
        return out
    for vid in sorted(os.listdir(root)):
        vdir = os.path.join(root, vid)
        if not os.path.isdir(vdir):
            continue
        for name in sorted(os.listdir(vdir)):
            if name.endswith(".npz") and not name.startswith("."):
                out.append((vid, name[:-4]))
    return out


# ----------------------------------------------------------------------------- runs
_RESULTS_CACHE: dict[str, tuple[float, dict, dict]] = {}


def _run_results(run_dir: str) -> tuple[dict, dict] | None:
    """The run's results.json (cached by mtime) for runs without stored probabilities."""
    from projects.sasasa2va.evaluation.results_io import read_results

    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    mtime = os.path.getmtime(path)
    cached = _RESULTS_CACHE.get(path)
    if cached is None or cached[0] != mtime:
        res, meta = read_results(path)
        cached = (mtime, res, meta)
        _RESULTS_CACHE[path] = cached
    return cached[1], cached[2]


def run_name(run_dir: str) -> str:
    """A run is named by its folder (e.g. ``uniform`` or ``26b_q_frame``); names must be unique."""
    return os.path.basename(os.path.normpath(run_dir))


def run_mode(run_dir: str) -> str | None:
    """The inference mode: the folder name if it is a mode, else results.json's __meta__.mode."""
    name = run_name(run_dir)
    if name in MODES:
        return name
    res = _run_results(run_dir)
    if res is not None and res[1].get("mode") in MODES:
        return res[1]["mode"]
    return None


def is_run_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "probs")) or os.path.isfile(os.path.join(path, "results.json"))


def discover_runs(paths: Sequence[str]) -> list[str]:
    """Expand each path: a run dir stays, a folder of run dirs becomes its run subfolders (sorted)."""
    out: list[str] = []
    for p in paths:
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p}: run directory not found")
        if is_run_dir(p):
            out.append(p)
            continue
        subs = [os.path.join(p, d) for d in sorted(os.listdir(p)) if is_run_dir(os.path.join(p, d))]
        if not subs:
            raise FileNotFoundError(f"{p}: neither a run dir (probs/ or results.json) nor a folder of runs")
        out.extend(subs)
    names = [run_name(r) for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"run names must be unique (folder names), duplicated: {dup}")
    return out


def default_members(run_dirs: Sequence[str]) -> list[str]:
    """Member set when no selection was run (§11.3): every run of one of the five modes, mode order."""
    order = {m: i for i, m in enumerate(MODES)}
    modes = [(run_mode(r), i, r) for i, r in enumerate(run_dirs)]
    chosen = sorted([t for t in modes if t[0] in order], key=lambda t: (order[t[0]], t[1]))
    return [t[2] for t in chosen]


def run_keys(run_dir: str) -> set[tuple[str, str]]:
    """Every (video, exp) a run can provide (stored probabilities, else its results.json masks)."""
    keys = set(list_probs(run_dir))
    res = _run_results(run_dir)
    if res is not None:
        keys.update((v, e) for v, exps in res[0].items() for e in exps)
    return keys


def load_member(run_dir: str, video_id: str, exp_id: str) -> np.ndarray | None:
    """uint8 [T,H,W] probabilities of one run, or None when the run lacks the expression.

    Falls back to the run's binary results.json masks (as 0/255) for runs made without --save-probs.
    """
    if os.path.isfile(probs_path(run_dir, video_id, exp_id)):
        return load_probs(run_dir, video_id, exp_id)
    res = _run_results(run_dir)
    if res is None:
        return None
    entry = (res[0].get(video_id) or {}).get(exp_id)
    if entry is None or not entry.get("prediction_masks"):
        return None
    from projects.sasasa2va.evaluation.results_io import entry_masks

    where = f"{os.path.join(run_dir, 'results.json')}: {video_id}/{exp_id}"
    return entry_masks(entry, where=where).astype(np.uint8) * 255


def member_source(run_dir: str, video_id: str, exp_id: str) -> str:
    """The file ``load_member`` reads the expression from (named in errors about what it held)."""
    path = probs_path(run_dir, video_id, exp_id)
    return path if os.path.isfile(path) else os.path.join(run_dir, "results.json")


# ----------------------------------------------------------------------------- ensembling
def _norm_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"expected {n} weights, got {w.shape[0] if w.ndim else w}")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative with a positive sum, got {w.tolist()}")
    return w


def ensemble_masks(members: Sequence[np.ndarray], weights=None, threshold: float = 0.5,
                   voting: str = "probs", member_threshold: float = 0.5) -> np.ndarray:
    """Weighted per-pixel mean of member probabilities (uint8 or float [T,H,W]) > threshold.

    voting="binary" first binarises each member at member_threshold (soft voting of masks); with
    equal weights, threshold 0.5 and an odd member count that is a strict majority vote.
    """
    if voting not in VOTING:
        raise ValueError(f"voting must be one of {VOTING}, got {voting!r}")
    if len(members) == 0:
        raise ValueError("ensemble needs at least one member")
    shape = np.shape(members[0])
    for m in members[1:]:
        if np.shape(m) != shape:
            raise ValueError(f"member shapes differ: {shape} vs {np.shape(m)}")
    w = _norm_weights(weights, len(members))
    if (voting == "probs" and threshold == 0.5 and len(members) < 255 and (w == w[0]).all()
            and all(np.asarray(m).dtype == np.uint8 for m in members)):
        return _mean_over_half_uint8(members)
    return _weighted_mean_over(members, w, threshold, voting, member_threshold)


def _weighted_mean_over(members, w, threshold: float, voting: str, member_threshold: float) -> np.ndarray:
    """The definition, in float32: sum of w_i * p_i, divided by the sum of the weights, > threshold."""
    acc = np.zeros(np.shape(members[0]), dtype=np.float32)
    for m, wi in zip(members, w):
        p = _as_float_probs(m)
        if voting == "binary":
            p = (p > member_threshold).astype(np.float32)
        acc += np.float32(wi) * p
    return acc / np.float32(w.sum()) > threshold


def _as_float_probs(m) -> np.ndarray:
    """Probabilities in float32 (uint8 ones / 255)."""
    m = np.asarray(m)
    return m.astype(np.float32) / 255.0 if m.dtype == np.uint8 else m.astype(np.float32)


def _mean_over_half_uint8(members) -> np.ndarray:
    """The selective average's case (n < 255 uint8 maps, equal weights, > 0.5) in integers: mean > 0.5 <=>
    2 * sum > 255 n (five maps of 80 frames at 1280x720: 0.54 s in float32 -> 0.06 s, on the writer threads
    of every expression).
    The float32 definition agrees wherever 2 * sum != 255 n: the mean is then at least 1/(510 n) away from
    0.5, above float32's error of a sum of n terms (n * 2^-24 relative) for n < 255. Exact ties (even n
    only) are decided by the definition itself, on those pixels alone."""
    n = len(members)
    total = np.zeros(np.shape(members[0]), dtype=np.uint16)
    for m in members:
        np.add(total, m, out=total)
    out = total > (255 * n) // 2
    if (255 * n) % 2 == 0:
        ties = np.flatnonzero(total == (255 * n) // 2)
        if len(ties):
            picked = [np.asarray(m).reshape(-1)[ties] for m in members]
            out.reshape(-1)[ties] = _weighted_mean_over(picked, np.ones(n), 0.5, "probs", 0.5)
    return out


def agreeing_members(members: Sequence[np.ndarray], weights=None, threshold: float = 0.5, voting: str = "probs",
                     min_iou: float | None = None, member_threshold: float = 0.5) -> list[int]:
    """Per-expression selection (spec evaluation §3.3 (c)): the indices of the members whose mask agrees with
    the consensus of all of them.

    The consensus is ``ensemble_masks`` of every member; a member's mask is its probabilities >
    ``member_threshold``; agreement is their IoU over every frame of the expression (both empty: 1). Members
    below ``min_iou`` are dropped -- one run that lost the object cannot pull an uncertain frame of the others
    below the threshold. None (or 0) keeps every member, and so does a consensus no member reaches.
    Computed ``_CHUNK`` frames at a time (full-size float temporaries)."""
    everyone = list(range(len(members)))
    if not min_iou or len(members) < 2:
        return everyone
    inter = np.zeros(len(members), dtype=np.int64)
    union = np.zeros(len(members), dtype=np.int64)
    for start in range(0, int(np.shape(members[0])[0]), _CHUNK):
        chunk = [np.asarray(m[start:start + _CHUNK]) for m in members]
        consensus = ensemble_masks(chunk, weights, threshold, voting, member_threshold)
        for i, m in enumerate(chunk):
            mask = _as_float_probs(m) > member_threshold  # (binary voting's member masks)
            inter[i] += np.count_nonzero(mask & consensus)
            union[i] += np.count_nonzero(mask | consensus)
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    kept = [i for i in everyone if iou[i] >= min_iou]
    return kept or everyone


def _check_min_iou(min_iou: float | None) -> None:
    """Before any work: an IoU bound above 1 would silently keep every member (none reaches it)."""
    if min_iou is not None and not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")


def _expression_keys(run_dirs: Sequence[str]) -> list[tuple[str, str]]:
    seen, out = set(), []
    for r in run_dirs:
        for k in sorted(run_keys(r)):
            if k not in seen:
                seen.add(k)
                out.append(k)
    return out


def ensemble(run_dirs: Sequence[str], weights=None, threshold: float = 0.5, voting: str = "probs",
             keys: Sequence[tuple[str, str]] | None = None,
             min_iou: float | None = None) -> Iterator[tuple[str, str, np.ndarray | None]]:
    """Yield (video_id, exp_id, bool [T,H,W]) for each expression; a run lacking one is left out of
    that expression's mean, and None is yielded when no run has it. ``min_iou``: per-expression selection
    (``agreeing_members``) before the mean."""
    w = _norm_weights(weights, len(run_dirs))
    for vid, eid in (keys if keys is not None else _expression_keys(run_dirs)):
        got = [(load_member(r, vid, eid), wi, r) for r, wi in zip(run_dirs, w)]
        got = [(p, wi, r) for p, wi, r in got if p is not None]
        if not got:
            yield vid, eid, None
            continue
        if len({p.shape for p, _, _ in got}) > 1:  # named here: ensemble_masks knows no files
            listed = ", ".join(f"{member_source(r, vid, eid)} {list(p.shape)}" for p, _, r in got)
            raise ValueError(f"{vid}/{eid}: the members' probabilities differ in shape [T, H, W]: {listed}")
        try:
            probs, ws = [p for p, _, _ in got], [wi for _, wi, _ in got]
            kept = agreeing_members(probs, ws, threshold, voting, min_iou)
            masks = ensemble_masks([probs[i] for i in kept], [ws[i] for i in kept], threshold, voting)
        except ValueError as e:
            raise ValueError(f"{vid}/{eid}: {e}") from e
        yield vid, eid, masks


def _frame_size(record) -> tuple[int, int]:
    from PIL import Image

    path = record.frame_path(0)
    with Image.open(path) as im:
        w, h = im.size
    return h, w


def write_ensemble_results(run_dirs: Sequence[str], out_path: str, split_dir: str, weights=None,
                           threshold: float = 0.5, voting: str = "probs", split_name: str | None = None,
                           meta: dict | None = None, allow_incomplete: bool = False, progress: bool = False,
                           min_iou: float | None = None) -> dict:
    """Ensemble every expression of the split (dataset order) into a results.json at out_path.

    Members must hold every expression of the split; with ``allow_incomplete`` an expression is averaged
    over the members that have it, and one that no member has is left out (so a scorer gives it 0).
    Returns the __meta__ written. ``progress``: a bar of the expressions averaged, on stderr. ``min_iou``:
    per-expression selection of the members (``agreeing_members``).
    """
    from projects.sasasa2va.datasets.readers import read_meta_expressions
    from projects.sasasa2va.evaluation.results_io import make_entry, not_in_split, write_results
    from projects.sasasa2va.hf.models.templates import eval_prompt

    records = read_meta_expressions(os.path.join(split_dir, "meta_expressions.json"),
                                    os.path.join(split_dir, "JPEGImages"), allow_empty_text=True)
    keys = [(v, e) for v, rec in records.items() for e in rec.expressions]
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    wanted = set(keys)
    for r in run_dirs:  # a member lacking expressions would silently drop out of their averages
        have = run_keys(r)
        missing, foreign = sorted(wanted - have), not_in_split(sorted(have), records)
        if foreign:
            raise ValueError(f"run {r} has {len(foreign)} expression(s) that {split_dir} does not, e.g. "
                             f"{foreign[0][0]}/{foreign[0][1]}: a run of another split?")
        if missing and not allow_incomplete:
            raise ValueError(f"run {r} lacks {len(missing)} expression(s) of {split_dir}, e.g. "
                             f"{missing[0][0]}/{missing[0][1]}; average complete runs (allow_incomplete: those "
                             f"expressions are averaged over the members that have them)")
    _check_min_iou(min_iou)
    masks_iter = ensemble(run_dirs, weights, threshold, voting, keys=keys, min_iou=min_iou)

    def entries(bar):
        for index, (vid, eid, masks) in enumerate(masks_iter):
            counted(bar, index)
            rec = records[vid]
            status, error = "ok", None
            if masks is None:  # (only with allow_incomplete) left out: scorers give it J = F = 0
                continue
            if masks.shape[0] != rec.num_frames:
                files = ", ".join(member_source(r, vid, eid) for r in run_dirs if (vid, eid) in run_keys(r))
                raise ValueError(f"{vid}/{eid}: members have {masks.shape[0]} frames, the split has "
                                 f"{rec.num_frames} (expected [T, H, W] with T = {rec.num_frames}): {files}")
            yield make_entry(index, vid, eid, rec.frame_names, masks, text_prediction="",
                             exp=eval_prompt(rec.expressions[eid].text), status=status, error=error)

    m = {"split": split_name or run_name(split_dir), "num_videos": len(records),
         "num_expressions": len(keys), "mode": "ensemble", "members": [run_name(r) for r in run_dirs],
         "weights": None if weights is None else [float(x) for x in weights],
         "threshold": threshold, "voting": voting}
    if min_iou:
        m["min_iou"] = float(min_iou)
    m.update(meta or {})
    with progress_bar(progress, len(keys), "average") as bar:
        write_results(out_path, entries(bar), m)
    return m


# ----------------------------------------------------------------------------- greedy selection
def _score_candidates(task: dict) -> list[tuple[float, float]]:
    """(J, F) of one expression for every candidate subset; self-contained for worker processes."""
    from projects.sasasa2va.datasets.readers import expression_masks
    from projects.sasasa2va.metrics.jf import frame_size_from_masks, prepare_gt, score_prepared

    record, eid, run_dirs = task["record"], task["exp_id"], task["run_dirs"]
    needed = sorted({i for s in task["subsets"] for i in s})
    n = record.num_frames
    size = frame_size_from_masks(task["mask_dict"])  # None: the ground truth is empty, the first member's size
    probs = {}
    for i in needed:
        p = load_member(run_dirs[i], record.video_id, eid)
        if p is None:
            raise FileNotFoundError(f"run {run_dirs[i]} has no prediction for {record.video_id}/{eid}")
        size = size or tuple(p.shape[1:])
        if p.shape != (n, *size):  # (named here: the scorer's shape error would name no file)
            raise ValueError(f"{member_source(run_dirs[i], record.video_id, eid)}: {record.video_id}/{eid} has "
                             f"probabilities of shape {list(p.shape)}, expected [T, H, W] = {[n, *size]} (the "
                             f"split's frames)")
        probs[i] = p
    j_sum = np.zeros(len(task["subsets"]))
    f_sum = np.zeros(len(task["subsets"]))
    subsets = task["subsets"]
    if task.get("min_iou"):  # each subset's members that agree with its consensus on this expression
        subsets = [[subset[i] for i in agreeing_members([probs[j] for j in subset],
                                                        [task["weights"][j] for j in subset], task["threshold"],
                                                        task["voting"], task["min_iou"])]
                   for subset in subsets]
    for start in range(0, n, _CHUNK):
        idx = list(range(start, min(n, start + _CHUNK)))
        gt = expression_masks(record, eid, task["mask_dict"], frame_indices=idx, frame_size_hw=size)
        prepared = prepare_gt(gt)
        for k, subset in enumerate(subsets):
            pred = ensemble_masks([probs[i][start:start + len(idx)] for i in subset],
                                  [task["weights"][i] for i in subset], task["threshold"], task["voting"])
            j, f = score_prepared(prepared, pred)
            j_sum[k] += j.sum()
            f_sum[k] += f.sum()
    return [(j_sum[k] / max(n, 1), f_sum[k] / max(n, 1)) for k in range(len(task["subsets"]))]


def _score_subsets(subsets, records, mask_dict, run_dirs, weights, threshold, voting, workers, bar=None,
                   min_iou=None):
    """Split-level {J, F, J&F} for each subset (one pass over the split's expressions; ``bar`` counts them)."""
    from projects.sasasa2va.metrics.jf import aggregate, sub_mask_dict

    def tasks():
        for vid, rec in records.items():
            for eid, exp in rec.expressions.items():
                sub = sub_mask_dict(mask_dict, exp.anno_ids)
                yield {"record": rec, "exp_id": eid, "mask_dict": sub, "run_dirs": list(run_dirs),
                       "weights": list(weights), "subsets": subsets, "threshold": threshold,
                       "voting": voting, "min_iou": min_iou}

    if workers and workers > 1:
        import multiprocessing as mp

        with mp.get_context().Pool(workers) as pool:
            per_exp = [counted(bar, r) for r in pool.imap(_score_candidates, tasks(), chunksize=1)]
    else:
        per_exp = [counted(bar, _score_candidates(t)) for t in tasks()]
    return [aggregate([{"J": e[k][0], "F": e[k][1]} for e in per_exp]) for k in range(len(subsets))]


def format_steps(steps: list[dict]) -> str:
    """The step table: every evaluated candidate, '*' marks the one kept at each step."""
    names_w = max([len(c["added"]) for s in steps for c in s["candidates"]] + [9])
    lines = [f"{'step':>4}  {'candidate':<{names_w}}  {'J':>6}  {'F':>6}  {'J&F':>6}  members"]
    for s in steps:
        for c in s["candidates"]:
            mark = "*" if c["added"] == s["added"] else " "
            lines.append(f"{s['step']:>4}  {c['added']:<{names_w}}  {100 * c['J']:6.2f}  {100 * c['F']:6.2f}  "
                         f"{100 * c['J&F']:6.2f}{mark} {' + '.join(c['members'])}")
    return "\n".join(lines)


def greedy_select(run_dirs: Sequence[str], split_dir: str, weights=None, threshold: float = 0.5,
                  voting: str = "probs", max_members: int | None = None, workers: int = 1,
                  log: Callable[[str], None] | None = None, progress: bool = False,
                  min_iou: float | None = None) -> dict:
    """Forward selection of the member set maximising J&F on a split with ground truth.

    Each step adds the run that gives the best ensemble J&F (ties: earlier run in the given order);
    steps continue up to max_members (default all runs) and the chosen set is the best step, ties going
    to fewer members. Returns {"members" (run dirs), "names", "J", "F", "J&F", "steps", "table"}.
    ``progress``: a bar per step of the expressions scored, on stderr. ``min_iou``: every candidate set is
    scored with per-expression selection of its members (``agreeing_members``).
    """
    from projects.sasasa2va.datasets.readers import load_mask_dict, read_meta_expressions
    from projects.sasasa2va.metrics.jf import split_paths

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("greedy_select needs at least one run")
    _check_min_iou(min_iou)
    names = [run_name(r) for r in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names (folder names) must be unique, got {names}")
    w = _norm_weights(weights, len(run_dirs)).tolist()
    meta_path, mask_path, image_folder = split_paths(split_dir)
    records = read_meta_expressions(meta_path, image_folder, allow_empty_text=True)
    mask_dict = load_mask_dict(mask_path)
    wanted = {(v, e) for v, rec in records.items() for e in rec.expressions}
    for r in run_dirs:
        missing = sorted(wanted - run_keys(r))
        if missing:
            raise ValueError(f"run {r} lacks {len(missing)} expression(s) of {split_dir}, e.g. "
                             f"{missing[0][0]}/{missing[0][1]}; selection needs complete runs")
    limit = len(run_dirs) if max_members is None else max(1, min(max_members, len(run_dirs)))
    chosen: list[int] = []
    steps: list[dict] = []
    for step in range(1, limit + 1):
        cands = [i for i in range(len(run_dirs)) if i not in chosen]
        subsets = [chosen + [i] for i in cands]
        with progress_bar(progress, len(wanted), f"step {step}") as bar:
            scores = _score_subsets(subsets, records, mask_dict, run_dirs, w, threshold, voting, workers, bar,
                                    min_iou)
        best = 0
        for k in range(1, len(cands)):
            if scores[k]["J&F"] > scores[best]["J&F"] + _TIE:
                best = k
        chosen = subsets[best]
        rows = [{"added": names[i], "members": [names[j] for j in s], **sc}
                for i, s, sc in zip(cands, subsets, scores)]
        steps.append({"step": step, "added": names[cands[best]], "members": [names[j] for j in chosen],
                      "J": scores[best]["J"], "F": scores[best]["F"], "J&F": scores[best]["J&F"],
                      "candidates": rows})
        if log is not None:
            log(f"step {step}: + {names[cands[best]]} -> J&F {100 * scores[best]['J&F']:.2f} "
                f"({' + '.join(steps[-1]['members'])})")
    best_step = steps[0]
    for s in steps[1:]:
        if s["J&F"] > best_step["J&F"] + _TIE:
            best_step = s
    members = [run_dirs[names.index(n)] for n in best_step["members"]]
    return {"members": members, "names": list(best_step["members"]),
            "weights": [w[names.index(n)] for n in best_step["members"]],
            "J": best_step["J"], "F": best_step["F"], "J&F": best_step["J&F"],
            "threshold": threshold, "voting": voting, "min_iou": min_iou, "steps": steps,
            "table": format_steps(steps)}
