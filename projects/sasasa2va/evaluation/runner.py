"""Ref-VOS evaluation runner (spec evaluation.md §1.1, §2.1, §4, decisions §11).

One rank (or each rank of a torchrun job) takes its shard of expressions (``sharding``), video-major,
loads each video's frames once and computes the video once for all its expressions and ALL requested
modes: ``model.predict_video`` on one ``VideoContext`` (SAM2 features, vision tokens, prompt prefix,
answers shared; ``--feature-budget-mb`` bounds the cached features; one video at a time). Models
without ``predict_video`` go through ``predict_forward`` per expression and mode; ``--naive``
recomputes everything per (expression, mode) (benchmark baseline, same outputs). Two files are written
per (mode, expression) as it finishes, on a writer thread (``output_writer``; drained before the rank
reports done)::

    <run_dir>/preds/<video>/<exp_id>.json   the results.json entry (atomic; the "done" marker)
    <run_dir>/probs/<video>/<exp_id>.npz    uint8 probabilities (averaging.save_probs)

so a killed run resumes on rerun. When every rank has finished (marker files, see ``distributed.wait_for_ranks``),
rank 0 assembles ``<run_dir>/results.json`` in dataset order from the per-expression files, averages
modes (``--average``) and writes the submission PNGs (``--submit``). ``run_dir`` is the work dir for one
mode and ``<work_dir>/modes/<mode>`` for several.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import traceback
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from projects.sasasa2va.evaluation import sharding
from projects.sasasa2va.evaluation.average_ahead import AverageAhead, ahead_dir, averaged_entry, read_ahead
from projects.sasasa2va.evaluation.averaging import encode_probs, load_probs, probs_path, quantize_probs, save_probs
from projects.sasasa2va.evaluation.distributed import (
    DistContext, barrier, clean_markers, env_int, init_distributed, shutdown_distributed, wait_for_ranks, write_marker,
)
from projects.sasasa2va.evaluation.model_loading import check_hf_dir, load_model
from projects.sasasa2va.evaluation.output_writer import (
    WRITER_MAX_PENDING, BackgroundWriter, writer_pending_bytes, writer_threads,
)
from projects.sasasa2va.evaluation.predictions import (
    ExpressionOutput, ExpressionTask, PredictOptions, failed_output, fit_options_to_model, normalize_output,
    predict_video, probs_request,
)
from projects.sasasa2va.evaluation.results_io import encode_masks, make_entry, read_entry, write_results
from projects.sasasa2va.evaluation.shared_encodings import encode_once
from projects.sasasa2va.evaluation.splits import ResolvedSplit, resolve_split
from projects.sasasa2va.hf.models.frame_sampling import MODES
from projects.sasasa2va.hf.models.templates import eval_prompt
from projects.sasasa2va.utils.cli import device_problem
from projects.sasasa2va.utils.io import atomic_write_json, sweep_temp_files

logger = logging.getLogger("sasasa2va.eval")

MAX_LISTED_FAILURES = 20
AVERAGE_WORKERS = min(8, os.cpu_count() or 1)  # threads averaging expressions (average_runs) ...
AVERAGE_MEMORY_BYTES = 2 << 30  # ... holding at most about this much at once
AVERAGE_AHEAD = True  # average an expression on its rank as soon as its member modes are in (AverageAhead)
WRITER_THREADS = None  # None: output_writer.writer_threads(); an int overrides it (benchmark A/B runs)
WRITER_PENDING_BYTES = None  # None: output_writer.writer_pending_bytes(); an int overrides it (likewise)
FRAME_PREFETCH = True  # decode the next video's frames in a thread while the model works on this one


# ================================================================================================ options
@dataclass
class EvalOptions:
    """Everything a run needs (the CLI flags of ref_vos_eval.py map 1:1 onto these)."""

    hf_dir: str
    dataset: str = "MEVIS"
    work_dir: str | None = None
    modes: Sequence[str] = ("uniform",)
    average: bool = False
    average_members: Sequence[str] | None = None
    average_threshold: float = 0.5
    submit: bool = False
    blind_expression: str | None = None
    max_videos: int | None = None
    videos: Sequence[str] | None = None
    dtype: str = "auto"
    device: str | None = None
    remote_code: bool = True
    shard_by: str = "video"
    launcher: str = "none"
    data_root: str | None = None
    split_dir: str | None = None
    qframe_file: str | None = None
    model_factory: str | Callable | None = None  # tests: "module:function" / "file.py:function" / callable
    retry_failed: bool = False
    overwrite: bool = False
    dist_timeout: float = 6 * 3600.0
    progress: bool = True
    naive: bool = False                   # recompute per (expression, mode): the benchmark baseline
    feature_budget_mb: float | None = None  # SAM2 features cached per video (None: the whole video)
    predict_options: dict = field(default_factory=dict)  # predict_forward options (e.g. max_new_tokens)


def parse_modes(text: str | Sequence[str]) -> list[str]:
    """'uniform,q_frame' / 'all' / a list -> validated modes, order kept, duplicates dropped."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p and p.strip()]
    if not parts:
        raise ValueError("--mode needs at least one mode")
    out: list[str] = []
    for p in parts:
        for m in (MODES if p == "all" else (p,)):
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r}; expected one of {', '.join(MODES)} or 'all'")
            if m not in out:
                out.append(m)
    return out


def default_work_dir(dataset: str, modes: Sequence[str]) -> str:
    tag = "all" if list(modes) == list(MODES) else "+".join(modes)
    return os.path.join("work_dirs", "eval", f"{dataset}_{tag}")


# ================================================================================================ data
def select_records(records: dict, videos: Sequence[str] | None, max_videos: int | None) -> dict:
    """Subset for quick runs: --videos (dataset order kept) then the first --max-videos."""
    out = records
    if videos:
        unknown = [v for v in videos if v not in records]
        if unknown:
            raise ValueError(f"--videos: {len(unknown)} unknown video id(s), e.g. {unknown[0]!r}")
        wanted = set(videos)
        out = {k: v for k, v in out.items() if k in wanted}
    if max_videos is not None:
        if max_videos < 1:
            raise ValueError(f"--max-videos must be >= 1, got {max_videos}")
        out = dict(itertools.islice(out.items(), max_videos))
    return out


def load_video_frames(record) -> list:
    """All frames of a video as RGB PIL images, same size (DataError naming the bad frame)."""
    from projects.sasasa2va.datasets.readers import check_same_frame_size, load_frame

    frames = [load_frame(record, i) for i in range(record.num_frames)]
    check_same_frame_size(record, frames)
    return frames


def _fallback_hw(record) -> tuple[int, int]:
    """Frame size from the first readable header (for failed entries of a broken video)."""
    from projects.sasasa2va.datasets.readers import frame_size

    for i in range(record.num_frames):
        try:
            return frame_size(record, i)
        except Exception:
            continue
    return 1, 1


# ================================================================================================ layout
def check_layout(work_dir: str, multi: bool) -> None:
    """A work dir holds one kind of run: one mode (its run_config.json and results.json at the top) or
    several (modes/<mode>/, and results.json = their average); one kind must not replace the other's
    results.json (use another --work-dir, or --overwrite)."""
    single = os.path.isfile(os.path.join(work_dir, "run_config.json"))
    modes_dir = os.path.join(work_dir, "modes")
    several = os.path.isdir(modes_dir) and any(os.path.isfile(os.path.join(modes_dir, m, "run_config.json"))
                                               for m in os.listdir(modes_dir))
    if multi and single:
        raise ValueError(f"{work_dir} holds a single-mode run (run_config.json, results.json); a run of several "
                         f"modes would replace its results.json; use another --work-dir or --overwrite")
    if not multi and several:
        raise ValueError(f"{work_dir} holds a run of several modes (modes/, results.json = their average); a "
                         f"single-mode run would replace that results.json; use another --work-dir (or "
                         f"--overwrite to discard it)")


def run_dir_for(work_dir: str, mode: str, modes: Sequence[str], multi: bool | None = None) -> str:
    """The work dir for a single-mode run, else <work_dir>/modes/<mode> (also when averaging)."""
    multi = len(modes) > 1 if multi is None else multi
    return os.path.join(work_dir, "modes", mode) if multi else work_dir


def preds_path(run_dir: str, video_id: str, exp_id: str) -> str:
    return os.path.join(run_dir, "preds", str(video_id), f"{exp_id}.json")


def _read_pred(run_dir: str, video_id: str, exp_id: str, num_frames: int) -> dict | None:
    """A finished expression's entry, or None when absent/unusable (then it is recomputed)."""
    return read_entry(preds_path(run_dir, video_id, exp_id), video_id, exp_id, num_frames)


def _is_done(run_dir: str, video_id: str, exp_id: str, num_frames: int, retry_failed: bool) -> bool:
    e = _read_pred(run_dir, video_id, exp_id, num_frames)
    if e is None:
        return False
    if e.get("status") == "ok" and not zipfile.is_zipfile(probs_path(run_dir, video_id, exp_id)):
        return False  # missing or cut short (its end record is written last): recomputed
    return not (retry_failed and e.get("status") == "failed")


def model_fingerprint(hf_dir) -> str | None:
    """Name, size and mtime of the folder's weight and config files: a model retrained or re-exported
    into the same folder must not resume the predictions of the previous one (cheap: no file is read)."""
    if not isinstance(hf_dir, str) or not os.path.isdir(hf_dir):
        return None
    parts = []
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith((".safetensors", ".bin", ".pth", ".json")):
            st = os.stat(os.path.join(hf_dir, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()[:16]


def _run_config(opts: EvalOptions, split: ResolvedSplit, mode: str) -> dict:
    return {"model": os.path.abspath(opts.hf_dir) if isinstance(opts.hf_dir, str) else str(opts.hf_dir),
            "model_fingerprint": model_fingerprint(opts.hf_dir),
            "split": split.name, "split_dir": split.split_dir, "mode": mode,
            "blind_expression": opts.blind_expression, "dtype": opts.dtype,
            "qframe_file": split.qframe_file if mode == "q_frame" else None,
            **({"predict_options": dict(opts.predict_options)} if opts.predict_options else {})}


def _check_run_config(run_dir: str, cfg: dict) -> None:
    path = os.path.join(run_dir, "run_config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, "r", encoding="utf-8") as f:
            old = json.load(f)
    except ValueError as exc:  # (not JSON, or not text: UnicodeDecodeError is a ValueError too)
        raise ValueError(f"{path}: not a run config (unreadable JSON: {exc}); use another --work-dir or "
                         "--overwrite") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path}: not a run config (a JSON object expected, got {type(old).__name__}); use "
                         "another --work-dir or --overwrite")
    diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
    if old.get("predict_options", {}) != cfg.get("predict_options", {}):  # recorded only when given
        diff["predict_options"] = (old.get("predict_options", {}), cfg.get("predict_options", {}))
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{run_dir} holds predictions of a different run ({lines}); use another --work-dir "
                         "or --overwrite")


# ================================================================================================ per rank
@dataclass
class RankStats:
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    model_seconds: float = 0.0
    work: dict = field(default_factory=dict)  # summed VideoContext work counters (shared/naive paths)
    writer_wait_seconds: float = 0.0  # the model's thread waiting for room in the output writer's queue
    writer_close_seconds: float = 0.0  # ... and for the writer to finish after the last prediction

    def add_work(self, counters: dict) -> None:
        for k, v in counters.items():
            self.work[k] = self.work.get(k, 0) + int(v)


def _entry_for(task: ExpressionTask, frame_names: list[str], out: ExpressionOutput, hw: tuple[int, int]) -> dict:
    masks = out.masks if out.masks is not None else np.zeros((len(frame_names),) + tuple(hw), dtype=bool)
    masks = encode_once("rle", masks, encode_masks)  # per-frame RLEs, once per array shared by several modes
    status = "ok" if out.status == "ok" else "failed"
    return make_entry(task.index, task.video_id, task.exp_id, frame_names, masks, text_prediction=out.prediction,
                      exp=task.prompt, status=status, error=out.error if status == "failed" else None)


def _write_output(run_dir: str, task: ExpressionTask, frame_names: list[str], out: ExpressionOutput,
                  hw: tuple[int, int], stats: RankStats, writer: BackgroundWriter | None = None,
                  mode: str | None = None, averager: AverageAhead | None = None) -> None:
    """Counts the output now and stores it (``_store_output``) on ``writer``'s thread when given; with
    ``averager``, the expression's averaged entry follows once its last member mode is in."""
    probs = quantize_probs(out.probs) if out.status in ("ok", "no_seg") and out.probs is not None else None
    stats.processed += 1
    stats.model_seconds += out.seconds
    if out.status != "ok":  # the entry's status is "failed" for everything but "ok" (see _entry_for)
        stats.failed += 1
        logger.warning("%s/%s failed: %s", task.video_id, task.exp_id, out.error)
    if writer is None:
        _store_output(run_dir, task, frame_names, out, probs, hw)
    else:
        held = sum(a.nbytes for a in (out.masks, probs) if a is not None)
        writer.submit_sized(held, _store_output, run_dir, task, frame_names, out, probs, hw)
    job = None if averager is None or mode is None else averager.add(
        mode, task.index, task.video_id, task.exp_id, frame_names, task.prompt, probs, out.status == "ok", hw)
    if job is not None:
        job() if writer is None else writer.submit(job)


def _store_output(run_dir: str, task: ExpressionTask, frame_names: list[str], out: ExpressionOutput,
                  probs: np.ndarray | None, hw: tuple[int, int]) -> None:
    """probs first, then the preds entry (its presence marks the expression as done)."""
    if probs is not None:
        save_probs(run_dir, task.video_id, task.exp_id, probs, encoded=encode_once("npz", probs, encode_probs))
    atomic_write_json(preds_path(run_dir, task.video_id, task.exp_id), _entry_for(task, frame_names, out, hw))


def input_errors_for(records: dict, meta_file: str, blind_expression: str | None) -> dict[tuple[str, str], str]:
    """{(video, exp): reason} for expressions that cannot be run at all (empty/whitespace text)."""
    from projects.sasasa2va.datasets.readers import empty_expression_error

    if blind_expression:
        return {}
    return {(v, e): empty_expression_error(meta_file, v, e, x.text)
            for v, r in records.items() for e, x in r.expressions.items() if not x.text.strip()}


def evaluate_shard(model, tokenizer, records: dict, items: Sequence[sharding.Item], indices: Sequence[int],
                   opts: EvalOptions, modes: Sequence[str], qframe: dict | None, progress: bool,
                   run_dirs: dict[str, str], options: PredictOptions | None = None,
                   input_errors: dict[tuple[str, str], str] | None = None,
                   averager: AverageAhead | None = None) -> RankStats:
    """Run this rank's items (video-major) for every mode, skipping finished expressions.

    ``input_errors``: {(video, exp): reason} of expressions recorded as failed without calling the model.
    ``averager``: averages each expression whose member modes all run here as soon as they are in.
    """
    options = fit_options_to_model(model, options or PredictOptions())
    options = dataclasses.replace(options, return_probs=probs_request(model, options.return_probs))
    input_errors = input_errors or {}
    stats = RankStats()
    mine = [items[i] for i in indices]
    pending: list[tuple[str, list[tuple[str, sharding.Item]]]] = []
    for vid, group in itertools.groupby(mine, key=lambda it: it.video_id):
        rec = records[vid]
        group = list(group)
        todo = [(m, it) for m in modes for it in group
                if not _is_done(run_dirs[m], it.video_id, it.exp_id, rec.num_frames, opts.retry_failed)]
        stats.skipped += len(group) * len(modes) - len(todo)
        if todo:
            pending.append((vid, todo))
        if averager is not None:
            pairs = set(todo)
            averager.expect((vid, it.exp_id) for it in group if all((m, it) in pairs for m in averager.members))
    total = sum(len(t) for _, t in pending)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="eval", unit="exp", dynamic_ncols=True)
    shared = supports_shared_path(model)
    budget = None if opts.feature_budget_mb is None else int(float(opts.feature_budget_mb) * 2**20)
    try:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        local = int(local) if local.isdigit() else 1
        threads = WRITER_THREADS if WRITER_THREADS is not None else writer_threads(local_processes=local)
        queue_bytes = WRITER_PENDING_BYTES if WRITER_PENDING_BYTES is not None else writer_pending_bytes(local)
        logger.info("output writer: %d thread(s), up to %.0f MB of outputs queued", threads, queue_bytes / 2**20)
        # drained also when the run fails: nothing computed is lost
        with BackgroundWriter(max_pending=WRITER_MAX_PENDING, threads=threads,
                              max_pending_bytes=queue_bytes) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="eval-frames") as loader:
            # the next video's frames are decoded during this one's model work (JPEG decoding drops the GIL;
            # ~5 ms a 1280x720 frame, ~0.4 s of a MeViS video's model thread otherwise)
            ahead = None
            for k, (vid, todo) in enumerate(pending):
                rec = records[vid]
                try:
                    frames = ahead.result() if ahead is not None else load_video_frames(rec)
                    hw, frame_error = (frames[0].size[1], frames[0].size[0]), None
                except Exception as exc:
                    frames, hw = None, _fallback_hw(rec)
                    frame_error = f"frame loading failed: {type(exc).__name__}: {exc}"
                ahead = loader.submit(load_video_frames, records[pending[k + 1][0]]) \
                    if FRAME_PREFETCH and k + 1 < len(pending) else None
                tasks_by_mode: dict[str, list[ExpressionTask]] = {}
                for mode in modes:
                    its = [it for m, it in todo if m == mode]
                    if not its:
                        continue
                    tasks = []
                    for it in its:
                        text = opts.blind_expression if opts.blind_expression else rec.expressions[it.exp_id].text
                        fids = qframe[vid][it.exp_id] if (mode == "q_frame" and qframe is not None) else None
                        task = ExpressionTask(it.index, vid, it.exp_id, text, eval_prompt(text), fids)
                        reason = input_errors.get((vid, it.exp_id))
                        if reason is not None:  # nothing to run: recorded as failed, the others go on
                            _write_output(run_dirs[mode], task, rec.frame_names, failed_output(reason), hw, stats,
                                          writer, mode, averager)
                            if bar is not None:
                                bar.update(1)
                            continue
                        tasks.append(task)
                    if tasks:
                        tasks_by_mode[mode] = tasks
                if shared and frame_error is None and tasks_by_mode:
                    # one VideoContext for every expression and mode of the video (naive: one per pair)
                    _run_video_shared(model, tokenizer, frames, hw, rec.frame_names, tasks_by_mode, run_dirs,
                                      options, stats, bar, naive=opts.naive, feature_budget_bytes=budget, writer=writer,
                                      averager=averager)
                else:  # models without predict_video (or unreadable frames): per-expression predict_forward
                    for mode, tasks in tasks_by_mode.items():
                        _run_video_mode(model, tokenizer, frames, frame_error, hw, rec.frame_names, tasks, mode,
                                        run_dirs[mode], options, stats, bar, writer, averager)
                del frames
        stats.writer_wait_seconds, stats.writer_close_seconds = writer.wait_seconds, writer.close_seconds
    finally:
        if bar is not None:
            bar.close()
    return stats


def _run_video_mode(model, tokenizer, frames, frame_error, hw, frame_names, tasks, mode, run_dir, options,
                    stats, bar, writer: BackgroundWriter | None = None, averager: AverageAhead | None = None) -> None:
    written: set[int] = set()

    def emit(i: int, out: ExpressionOutput) -> None:
        if i in written or not 0 <= i < len(tasks):
            return
        _write_output(run_dir, tasks[i], frame_names, out, hw, stats, writer, mode, averager)
        written.add(i)
        if bar is not None:
            bar.update(1)

    if frame_error is not None:
        for i in range(len(tasks)):
            emit(i, failed_output(frame_error))
        return
    try:
        outs = predict_video(model, tokenizer, frames, tasks, mode, options, on_result=emit)
        if len(outs) != len(tasks):
            raise ValueError(f"predict_video returned {len(outs)} outputs for {len(tasks)} expressions")
    except Exception as exc:
        logger.warning("video %s mode %s failed", tasks[0].video_id, mode, exc_info=True)
        outs = [failed_output(f"{type(exc).__name__}: {exc}")] * len(tasks)
    for i, out in enumerate(outs):
        emit(i, out)


def supports_shared_path(model) -> bool:
    """The model computes a video once for many (expression, mode) pairs: SaSaSa2VAChatModel's
    ``predict_video`` + ``video_context`` (test fakes with only ``predict_forward`` do not)."""
    return callable(getattr(model, "predict_video", None)) and callable(getattr(model, "video_context", None))


def _run_video_shared(model, tokenizer, frames, hw, frame_names, tasks_by_mode: dict, run_dirs: dict,
                      options: PredictOptions, stats: RankStats, bar, naive: bool = False,
                      feature_budget_bytes: int | None = None, writer: BackgroundWriter | None = None,
                      averager: AverageAhead | None = None) -> None:
    """Every pending (mode, expression) of one video through ``model.predict_video``.

    Shared (default): ONE ``VideoContext`` for the whole video, so SAM2 features, vision tokens, prompt
    prefixes, answers and decode results are computed once and reused by every expression and mode;
    the context (this video's features) is dropped on return. Expressions needing the same set of modes
    (all of them, except after a partial resume) go through one ``predict_video`` call, text-major.
    ``naive``: a fresh cache-less context per (expression, mode), i.e. ``predict_forward(naive=True)``
    per pair (the benchmark baseline). Each output goes to the writer as soon as it exists (resume works at
    (mode, expression) granularity); results equal the per-expression path bit for bit on CPU float32.
    """
    import torch

    modes = [m for m in MODES if m in tasks_by_mode] + [m for m in tasks_by_mode if m not in MODES]
    per_exp: dict[str, dict[str, ExpressionTask]] = {}
    for mode in modes:
        for task in tasks_by_mode[mode]:
            per_exp.setdefault(task.exp_id, {})[mode] = task
    groups: dict[tuple, list[dict[str, ExpressionTask]]] = {}
    for by_mode in per_exp.values():
        groups.setdefault(tuple(m for m in modes if m in by_mode), []).append(by_mode)
    written: set[tuple[str, str]] = set()
    clock = [time.perf_counter()]

    def emit(mode: str, task: ExpressionTask, out: ExpressionOutput) -> None:
        key = (mode, task.exp_id)
        if key in written:
            return
        out.seconds = time.perf_counter() - clock[0]  # model time since the previous output was written
        _write_output(run_dirs[mode], task, frame_names, out, hw, stats, writer, mode, averager)
        clock[0] = time.perf_counter()
        written.add(key)
        if bar is not None:
            bar.update(1)

    def run_group(ctx, group: list[dict[str, ExpressionTask]], group_modes: Sequence[str]) -> None:
        texts = [next(iter(by_mode.values())).prompt for by_mode in group]
        fids = {i: by_mode["q_frame"].selected_fids for i, by_mode in enumerate(group) if "q_frame" in by_mode}

        def on_result(mode: str, i: int, raw: dict) -> None:
            task = group[i][mode]
            if isinstance(raw, dict) and raw.get("status") == "failed":
                out = failed_output(str(raw.get("error") or "prediction failed"))
            else:
                try:
                    out = normalize_output(raw, len(frames), hw)
                except Exception as exc:
                    out = failed_output(f"{type(exc).__name__}: {exc}")
            if out.status == "failed" and torch.cuda.is_available():
                torch.cuda.empty_cache()
            emit(mode, task, out)

        model.predict_video(frames, texts, tokenizer, modes=list(group_modes), selected_fids=fids or None,
                            return_probs=options.return_probs, context=ctx, on_result=on_result,
                            keep_results=False, errors="record", **options.extra_kwargs)

    ctx = None
    try:
        if naive:
            for mode in modes:
                for task in tasks_by_mode[mode]:
                    ctx = model.video_context(tokenizer, frames, naive=True)
                    try:
                        run_group(ctx, [{mode: task}], [mode])
                    finally:
                        stats.add_work(ctx.counters.as_dict())
                        ctx = None
        else:
            ctx = model.video_context(tokenizer, frames, feature_budget_bytes,
                                      max_prefix_caches=len(modes) + 1)  # text-major order never evicts
            for group_modes, group in groups.items():
                run_group(ctx, group, group_modes)
    except Exception as exc:  # the video's remaining pairs fail; the run goes on
        logger.warning("video %s failed on the shared path", tasks_by_mode[modes[0]][0].video_id, exc_info=True)
        error = f"{type(exc).__name__}: {exc}"
        for mode in modes:
            for task in tasks_by_mode[mode]:
                emit(mode, task, failed_output(error))
    finally:
        if ctx is not None:
            stats.add_work(ctx.counters.as_dict())
        del ctx


# ================================================================================================ rank 0
def _split_meta(split: ResolvedSplit, opts: EvalOptions, all_records: dict, records: dict,
                items: Sequence[sharding.Item]) -> dict:
    meta = {"split": split.name, "num_videos": len(records), "num_expressions": len(items),
            "model": os.path.basename(os.path.normpath(str(opts.hf_dir)))}
    if len(records) != len(all_records):
        meta["subset"] = True
        meta["split_num_videos"] = len(all_records)
        meta["split_num_expressions"] = sum(len(r.expressions) for r in all_records.values())
    if opts.blind_expression:
        meta["blind_expression"] = opts.blind_expression
    return meta


def assemble_results(run_dir: str, records: dict, items: Sequence[sharding.Item], meta: dict) -> dict:
    """results.json of one run dir from its per-expression files, in dataset order.

    Returns {"path", "failed", "failures": [(video, exp, error)]}; a missing expression is an error.
    """
    entries, failures = [], []
    for it in items:
        e = _read_pred(run_dir, it.video_id, it.exp_id, records[it.video_id].num_frames)
        if e is None:
            raise RuntimeError(f"{preds_path(run_dir, it.video_id, it.exp_id)}: prediction missing after all "
                               "ranks finished")
        e["index"] = it.index
        if e.get("status") == "failed":
            failures.append((it.video_id, it.exp_id, e.get("error")))
        entries.append(e)
    path = os.path.join(run_dir, "results.json")
    write_results(path, entries, {**meta, "failed": len(failures)})
    return {"path": path, "failed": len(failures), "failures": failures}


def average_workers(records: dict, items: Sequence[sharding.Item], num_members: int) -> int:
    """Threads for average_runs: up to AVERAGE_WORKERS, fewer when the largest video's expressions (its
    members' uint8 maps + float32 sums, ~members + 12 bytes per pixel) would exceed AVERAGE_MEMORY_BYTES."""
    if len(items) <= 1 or AVERAGE_WORKERS <= 1:
        return 1
    largest = 0
    for vid in {it.video_id for it in items}:
        rec = records[vid]
        h, w = _fallback_hw(rec)
        largest = max(largest, rec.num_frames * h * w)
    per_item = max(largest * (num_members + 12), 1)
    return max(1, min(AVERAGE_WORKERS, len(items), AVERAGE_MEMORY_BYTES // per_item))


def average_runs(member_dirs: Sequence[str], member_names: Sequence[str], records: dict,
                 items: Sequence[sharding.Item], out_path: str, meta: dict, threshold: float = 0.5,
                 blind_expression: str | None = None, ahead: tuple[str, str] | None = None) -> dict:
    """Per-pixel mean of the members' stored probabilities > threshold (averaging.ensemble_masks).

    A member without probabilities for an expression (it raised there) is left out of that mean. The
    averaged expression is failed when no member succeeded on it (then its masks are the mean of the
    no_seg members' empty probabilities, or empty). ``ahead``: (work dir, run id) -- an expression that
    a rank of this run already averaged (``AverageAhead``, same members and threshold) is taken from
    there instead of being recomputed (the same entry).
    """
    def member_ok(d: str, it, num_frames: int) -> bool:
        e = _read_pred(d, it.video_id, it.exp_id, num_frames)
        return e.get("status") == "ok" if e is not None else True  # external run dir: probs only

    def entry(it):
        rec = records[it.video_id]
        if ahead is not None:
            done = read_ahead(ahead[0], it.video_id, it.exp_id, rec.num_frames, ahead[1], member_names, threshold)
            if done is not None:
                done["index"] = it.index
                return done
        probs, ok = [], []
        for name, d in zip(member_names, member_dirs):
            if os.path.isfile(probs_path(d, it.video_id, it.exp_id)):
                p = load_probs(d, it.video_id, it.exp_id)
                if p.shape[0] != rec.num_frames:
                    raise ValueError(f"{probs_path(d, it.video_id, it.exp_id)}: {p.shape[0]} frames, video "
                                     f"{it.video_id!r} has {rec.num_frames}")
                probs.append(p)
                if member_ok(d, it, rec.num_frames):
                    ok.append(name)
        text = blind_expression or rec.expressions[it.exp_id].text
        hw = (0, 0) if probs else _fallback_hw(rec)
        return averaged_entry(it.index, it.video_id, it.exp_id, rec.frame_names, eval_prompt(text), probs, ok,
                              member_names, threshold, hw)

    # expressions in worker threads (decompression and the mean release the GIL), entries in item order
    workers = average_workers(records, items, len(member_dirs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="average") as pool:
        entry_list = list(pool.map(entry, items))
    failures = [(e["video_id"], e["exp_id"], e["error"]) for e in entry_list if e["status"] == "failed"]
    m = {**meta, "mode": "average", "modes": list(member_names), "threshold": threshold, "failed": len(failures)}
    write_results(out_path, entry_list, m)
    return {"path": out_path, "failed": len(failures), "failures": failures}


def write_submission(results_path: str, ann_dir: str, split: ResolvedSplit, complete: bool,
                     progress: bool = False) -> dict:
    """PNGs of a results.json under ann_dir; checked against the split when the run covers all of it."""
    from projects.sasasa2va.evaluation.submission import PNG_WORKERS, check_submission, write_submission_pngs

    n = write_submission_pngs(results_path, ann_dir, workers=PNG_WORKERS, progress=progress)
    info: dict[str, Any] = {"dir": ann_dir, "num_png": n}
    if complete and os.path.basename(split.meta_file) == "meta_expressions.json":
        problems = check_submission(ann_dir, split.split_dir, workers=PNG_WORKERS, progress=progress)
        info["problems"] = problems[:MAX_LISTED_FAILURES]
        info["num_problems"] = len(problems)
    return info


# ================================================================================================ summary
def format_summary(s: dict) -> str:
    lines = [f"== evaluation summary: split {s['split']} ({s['split_dir']})",
             f"   {s['num_videos']} videos, {s['num_expressions']} expressions, modes {', '.join(s['modes'])}, "
             f"{s['world_size']} process(es)"]
    for name, r in s["runs"].items():
        lines.append(f"-- {name}: {s['num_expressions'] - r['failed']} ok, {r['failed']} failed -> {r['path']}")
        for vid, eid, err in r["failures"][:MAX_LISTED_FAILURES]:
            lines.append(f"     failed {vid}/{eid}: {err}")
        if r["failed"] > MAX_LISTED_FAILURES:
            lines.append(f"     ... and {r['failed'] - MAX_LISTED_FAILURES} more (see eval_summary.json)")
    t = s["this_run"]
    if t["processed"]:
        per = (f"{t['model_seconds_per_expression']:.3f} s model time per expression, "
               f"{t['wall_seconds'] / t['processed']:.3f} s wall per expression")
    else:
        per = "nothing left to predict"
    lines.append(f"-- this run: {t['processed']} expression(s) predicted, {t['skipped']} resumed from earlier runs, "
                 f"{t['failed']} failed; {per}; wall {t['wall_seconds']:.1f} s")
    if t.get("work"):
        w = t["work"]
        lines.append(f"   {t.get('path', '')} path work: {w.get('sam2_frames_encoded', 0)} SAM2 frames encoded, "
                     f"{w.get('mllm_images_encoded', 0)} MLLM images encoded, {w.get('tokens_prefilled', 0)} tokens "
                     f"prefilled, {w.get('tokens_decoded', 0)} decoded, {w.get('sam2_decodes', 0)} SAM2 decodes")
    for sub in s.get("submission", []):
        extra = ""
        if "num_problems" in sub:
            extra = " (check ok)" if sub["num_problems"] == 0 else f" (check: {sub['num_problems']} problem(s))"
        lines.append(f"-- submission PNGs: {sub['num_png']} in {sub['dir']}{extra}")
        for p in sub.get("problems", [])[:5]:
            lines.append(f"     {p}")
    lines.append(f"-- outputs under {s['work_dir']}")
    return "\n".join(lines)


# ================================================================================================ entry
def _resolve_members(opts: EvalOptions, modes: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(names, run dirs) of the averaging members, or None without averaging."""
    if not opts.average and not opts.average_members:
        return None
    names, dirs = [], []
    for m in (opts.average_members or modes):
        if m in modes:
            names.append(m)
            dirs.append(run_dir_for(opts.work_dir, m, modes, True))
        elif os.path.isdir(m):
            names.append(os.path.basename(os.path.normpath(m)))
            dirs.append(m)
        else:
            raise ValueError(f"--average-members: {m!r} is neither a mode of this run ({', '.join(modes)}) nor a "
                             "run directory")
    if len(dirs) < 2:
        raise ValueError(f"--average needs at least two members, got {names}")
    if not 0.0 < opts.average_threshold < 1.0:
        raise ValueError(f"--average-threshold must be in (0, 1), got {opts.average_threshold}")
    return names, dirs


def check_options(opts: EvalOptions) -> None:
    """Option values that cannot work, refused before the work dir, the process group or the model."""
    if opts.feature_budget_mb is not None and not float(opts.feature_budget_mb) >= 0:
        raise ValueError(f"--feature-budget-mb must be >= 0, got {opts.feature_budget_mb}")
    if not float(opts.dist_timeout) > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {opts.dist_timeout}")
    max_new = opts.predict_options.get("max_new_tokens")
    if max_new is not None and not (isinstance(max_new, int) and max_new >= 1):
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {max_new!r}")
    if opts.videos is not None and not list(opts.videos):
        raise ValueError("--videos: no video id given (leave it out to evaluate every video)")
    if opts.blind_expression is not None and not opts.blind_expression.strip():
        raise ValueError("--blind-expression: empty text; give the generic expression every object is asked for")
    problem = device_problem(opts.device)
    if problem:
        raise ValueError(problem)
    if opts.launcher == "pytorch":
        for name in ("RANK", "WORLD_SIZE"):
            try:
                env_int(name)
            except RuntimeError as exc:  # a launch mistake, not a failure of the run
                raise ValueError(str(exc)) from None


def run_evaluation(opts: EvalOptions) -> dict | None:
    """Run the whole evaluation on this process; returns the summary on rank 0 (None elsewhere).

    Any error of this rank is written to its marker file and re-raised, so the job fails loudly.
    """
    modes = parse_modes(opts.modes)
    check_options(opts)
    if opts.shard_by not in sharding.SCHEMES:
        raise ValueError(f"--shard-by must be one of {sharding.SCHEMES}, got {opts.shard_by!r}")
    if opts.work_dir is None:
        opts.work_dir = default_work_dir(opts.dataset, modes)
    if os.path.exists(opts.work_dir) and not os.path.isdir(opts.work_dir):
        raise ValueError(f"--work-dir {opts.work_dir}: exists and is not a folder")
    if opts.model_factory is None and isinstance(opts.hf_dir, str):
        check_hf_dir(opts.hf_dir)  # before anything is created in the work dir
    multi = len(modes) > 1 or bool(opts.average or opts.average_members)
    members = _resolve_members(opts, modes)
    ctx = init_distributed(opts.launcher, opts.device, opts.dist_timeout)
    try:
        return _run(opts, modes, multi, members, ctx)
    finally:
        shutdown_distributed(ctx)


def _run(opts: EvalOptions, modes: list[str], multi: bool, members, ctx: DistContext) -> dict | None:
    t_start = time.perf_counter()
    path = "per-expression"
    work_dir = opts.work_dir
    run_id = ctx.nonce or uuid.uuid4().hex  # tags the averages computed ahead in this run (all ranks)
    os.makedirs(work_dir, exist_ok=True)
    if ctx.is_main:
        clean_markers(work_dir, keep_nonce=ctx.nonce)
    try:
        split = resolve_split(opts.dataset, opts.data_root, opts.split_dir, opts.qframe_file)
        all_records = split.load_records()
        records = select_records(all_records, opts.videos, opts.max_videos)
        items = sharding.enumerate_items(records)
        run_dirs = {m: run_dir_for(work_dir, m, modes, multi) for m in modes}
        configs = {m: _run_config(opts, split, m) for m in modes}
        if opts.overwrite:
            if ctx.is_main:
                stale = [os.path.join(d, sub) for d in run_dirs.values()
                         for sub in ("preds", "probs", "Annotations", "results.json", "run_config.json")]
                stale += [os.path.join(work_dir, sub) for sub in ("Annotations", "results.json", "eval_summary.json")]
                # the other layout's predictions (a single-mode run's at the top, a multi-mode run's modes/)
                stale += [os.path.join(work_dir, sub) for sub in (("preds", "probs", "run_config.json") if multi
                                                                  else ("modes",))]
                stale.append(ahead_dir(work_dir))
                for p in stale:
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.unlink(p)
            barrier(ctx)
        else:
            check_layout(work_dir, multi)
            for m in modes:
                _check_run_config(run_dirs[m], configs[m])
            if ctx.is_main:  # before the barrier below, which no rank passes before it writes a prediction
                swept = sweep_temp_files([os.path.join(d, sub) for d in run_dirs.values() for sub in ("preds", "probs")]
                                         + [ahead_dir(work_dir)])
                if swept:
                    logger.info("removed %d temp file(s) of writes an earlier run did not finish, e.g. %s",
                                len(swept), swept[0])
        qframe = split.load_qframe(records) if "q_frame" in modes else None
        # (run_evaluation checked a folder given by name before creating the work dir)
        model, tokenizer = load_model(opts, ctx, hf_dir_checked=isinstance(opts.hf_dir, str))
        predict_options = fit_options_to_model(model, PredictOptions(extra_kwargs=dict(opts.predict_options)))
        if ctx.is_main:  # after the model loaded: a run that could not start claims no work dir
            for m in modes:
                atomic_write_json(os.path.join(run_dirs[m], "run_config.json"), configs[m], indent=1)
        barrier(ctx)  # no rank writes a prediction before the work dir names the run it belongs to
        path = ("naive" if opts.naive else "shared") if supports_shared_path(model) else "per-expression"
        averager = None
        if AVERAGE_AHEAD and members is not None and all(n in run_dirs and d == run_dirs[n]
                                                         for n, d in zip(*members)):
            averager = AverageAhead(work_dir, list(members[0]), opts.average_threshold, run_id)
        indices = sharding.shard_indices(items, ctx.world_size, ctx.rank, opts.shard_by, include_padding=False)
        logger.info("rank %d/%d: %d of %d expression(s), modes %s", ctx.rank, ctx.world_size, len(indices),
                    len(items), ",".join(modes))
        stats = evaluate_shard(model, tokenizer, records, items, indices, opts, modes, qframe,
                               progress=opts.progress and ctx.is_main, run_dirs=run_dirs,
                               options=predict_options,
                               input_errors=input_errors_for(records, split.meta_file, opts.blind_expression),
                               averager=averager)
        del model
    except BaseException as exc:
        write_marker(work_dir, ctx, "failed", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise
    own = {"rank": ctx.rank, "status": "done", "processed": stats.processed, "failed": stats.failed,
           "skipped": stats.skipped, "model_seconds": stats.model_seconds, "work": dict(stats.work),
           "writer_wait_seconds": stats.writer_wait_seconds, "writer_close_seconds": stats.writer_close_seconds}
    write_marker(work_dir, ctx, "done", **{k: v for k, v in own.items() if k not in ("rank", "status")})
    if not ctx.is_main:
        return None

    markers = wait_for_ranks(work_dir, ctx, opts.dist_timeout) if ctx.world_size > 1 else [own]
    clean_markers(work_dir, keep_nonce=None)
    meta = _split_meta(split, opts, all_records, records, items)
    runs: dict[str, dict] = {}
    for m in modes:
        runs[m] = assemble_results(run_dirs[m], records, items, {**meta, "mode": m})
    if members is not None:
        names, dirs = members
        runs["average"] = average_runs(dirs, names, records, items, os.path.join(work_dir, "results.json"), meta,
                                       opts.average_threshold, opts.blind_expression, ahead=(work_dir, run_id))
    submission = []
    if opts.submit:
        complete = len(records) == len(all_records)
        finals = [(runs["average"]["path"], os.path.join(work_dir, "Annotations"))] if members is not None else \
            [(runs[m]["path"], os.path.join(run_dirs[m], "Annotations")) for m in modes]
        for res_path, ann_dir in finals:
            submission.append(write_submission(res_path, ann_dir, split, complete, progress=opts.progress))
    processed = sum(mk.get("processed", 0) for mk in markers)
    model_s = sum(mk.get("model_seconds", 0.0) for mk in markers)
    work: dict[str, int] = {}
    for mk in markers:
        for k, v in (mk.get("work") or {}).items():
            work[k] = work.get(k, 0) + int(v)
    summary = {
        "split": split.name, "split_dir": split.split_dir, "work_dir": os.path.abspath(work_dir), "modes": modes,
        "num_videos": len(records), "num_expressions": len(items), "world_size": ctx.world_size,
        "shard_by": opts.shard_by, "runs": runs, "submission": submission,
        "this_run": {"processed": processed, "failed": sum(mk.get("failed", 0) for mk in markers),
                     "skipped": sum(mk.get("skipped", 0) for mk in markers), "model_seconds": model_s,
                     "model_seconds_per_expression": model_s / processed if processed else 0.0,
                     "wall_seconds": time.perf_counter() - t_start, "path": path, "work": work,
                     # summed over ranks: time the model's threads waited for the output writer
                     "writer_wait_seconds": sum(mk.get("writer_wait_seconds", 0.0) for mk in markers),
                     "writer_close_seconds": sum(mk.get("writer_close_seconds", 0.0) for mk in markers)},
    }
    atomic_write_json(os.path.join(work_dir, "eval_summary.json"), summary, indent=1)
    print(format_summary(summary), flush=True)
    return summary
