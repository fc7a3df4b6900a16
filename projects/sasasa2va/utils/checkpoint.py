"""Loading mmengine training checkpoints with ``torch.load(weights_only=True)`` and an explicit allow-list.

An mmengine ``iter_<n>.pth`` holds, besides tensors (``state_dict``, ``optimizer``), plain metadata
(``meta``, ``param_schedulers``) and the message hub, whose ``log_scalars`` are
``mmengine.logging.HistoryBuffer`` objects holding numpy arrays and numpy scalars. torch's weights-only
unpickler refuses those globals by default. Instead of unpickling the file fully (which would run any
code a crafted file names), exactly these globals are allowed:

* ``mmengine.logging.history_buffer.HistoryBuffer`` (instantiated with ``__new__`` and its ``__dict__``
  filled; no code of the class runs);
* numpy's array / dtype / scalar reconstructors (``numpy._core.multiarray._reconstruct``,
  ``numpy.ndarray``, ``numpy.dtype`` and the numeric ``numpy.dtypes.*DType`` classes,
  ``numpy._core.multiarray.scalar``; also under their numpy 1.x names ``numpy.core.multiarray.*``);
* ``builtins.getattr``, replaced by :func:`_history_buffer_getattr`, which only resolves
  ``getattr(HistoryBuffer, 'min' | 'max' | 'current' | 'mean')`` (the pickled statistics methods of the
  buffers) and refuses everything else.

Anything else in the pickle (``os.system``, ``subprocess``, arbitrary classes) makes ``torch.load`` raise
``pickle.UnpicklingError`` naming the global.

``allow_mmengine_checkpoints()`` registers the list process-wide; tools/train.py calls it before a
resume, so mmengine's own ``torch.load(filename, map_location=...)`` (weights_only defaults to True in
torch >= 2.6) reads the checkpoint without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``.

Not covered: DeepSpeed checkpoint folders (CUDA training) are read by DeepSpeed with
``weights_only=False``; resume only from folders your own runs wrote.
"""
from __future__ import annotations

import os
import pickle
from collections import deque

HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def _history_buffer_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` inside checkpoint pickles: HistoryBuffer statistics only."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"checkpoint pickle calls getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}); only "
        f"getattr(HistoryBuffer, {'|'.join(HISTORY_BUFFER_METHODS)}) is allowed")


def mmengine_checkpoint_safe_globals() -> list:
    """The allow-list (objects, or (object, pickled name) pairs) for ``torch.serialization.safe_globals``."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out: list = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_getattr, "builtins.getattr")]
    # numpy >= 1.25 restores a dtype's state on its concrete class (numpy.dtypes.Float64DType, ...)
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128):
        cls = type(np.dtype(t))
        if cls is not np.dtype and cls not in out:
            out.append(cls)
    for fn in (multiarray._reconstruct, multiarray.scalar):
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            out.append((fn, f"{mod}.{fn.__name__}"))
    return out


def allow_mmengine_checkpoints() -> None:
    """Register the allow-list process-wide (for mmengine's own torch.load calls during --resume)."""
    import torch

    torch.serialization.add_safe_globals(mmengine_checkpoint_safe_globals())


def load_mmengine_checkpoint(path: str, map_location="cpu") -> dict:
    """An mmengine ``.pth`` via ``torch.load(weights_only=True)`` + the allow-list above.

    Raises FileNotFoundError, or ValueError naming the file when the pickle needs anything else
    (a checkpoint that was not written by mmengine, or a malicious one).
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "global" in ln.lower() or "getattr" in ln), first[0] if first else "")
        raise ValueError(f"{path}: refused by the weights-only loader ({detail}); only tensors, plain "
                         "containers and mmengine's HistoryBuffer/numpy metadata are allowed") from exc


# --------------------------------------------------------------------------------------------------
# exact resume: RNG states in the checkpoint
# --------------------------------------------------------------------------------------------------
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.hooks import CheckpointHook, Hook  # noqa: E402


class RNGStateHook(Hook):
    """Save the torch / numpy / python RNG states in every checkpoint and restore them on resume.

    mmengine re-seeds a resumed run from the checkpoint's seed, so the random draws after the resume
    (loss point sampling, object subsets) would differ from an uninterrupted run. The states are taken
    when the checkpoint is written (end of iteration n) and put back right before iteration n + 1 of the
    resumed run, i.e. after the dataloader iterator was created (which itself draws from torch's RNG), so
    an interrupted and resumed CPU run reproduces the uninterrupted one. The states are tensors, numpy
    arrays and ints, so the checkpoint stays loadable with weights_only=True (see above). mmengine writes
    checkpoints on rank 0 only, so only rank 0's state is stored and restored; the other ranks of a
    multi-process run keep mmengine's re-seeding.
    """

    priority = "VERY_LOW"

    def __init__(self):
        self._pending = None

    @staticmethod
    def capture() -> dict:
        import random

        import numpy as np
        import torch

        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # current device only (no context on the others)
        return state

    @staticmethod
    def restore(state: dict) -> None:
        import random

        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        np.random.set_state(tuple(state["numpy"]))
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if torch.is_tensor(state.get("cuda")) and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["rng_state"] = self.capture()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_state")
        if self._pending is None:
            runner.logger.warning("RNGStateHook: the resumed checkpoint has no RNG state; random draws after the "
                                  "resume will differ from an uninterrupted run")

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._pending is not None:
            rank = int(getattr(runner, "rank", 0) or 0)
            if rank == 0:
                self.restore(self._pending)
            self._pending = None


TEMP_PREFIX = ".tmp_"  # a checkpoint being saved: <folder>/.tmp_<pid>_iter_<n>.pth, renamed when complete


def remove_stale_temp_checkpoints(work_dir: str) -> list[str]:
    """Remove (and name) the temp files of checkpoint saves that a kill cut short."""
    if not os.path.isdir(work_dir):
        return []
    stale = [n for n in os.listdir(work_dir)
             if n.startswith(TEMP_PREFIX) and iter_number(n.split("_", 2)[-1]) is not None]
    for name in stale:
        os.unlink(os.path.join(work_dir, name))
    return stale


class SafeCheckpointHook(CheckpointHook):
    """mmengine's CheckpointHook, except that the checkpoints beyond ``max_keep_ckpts`` are removed after
    the new one is saved, not before: mmengine 0.10 deletes first, so with ``max_keep_ckpts=1`` a kill
    (or a full disk) during the save leaves no checkpoint at all -- and a DeepSpeed folder, written in
    place, is never complete until the save ends. The saved message hub already holds the pruned list of
    kept checkpoints (as mmengine's does). A save that fails removes nothing."""

    def _save_checkpoint_with_step(self, runner, step, meta):
        keep = self.max_keep_ckpts
        if keep <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return super()._save_checkpoint_with_step(runner, step, meta)
        ids = list(self.keep_ckpt_ids) + [step]
        stale, ids = ids[:-keep], ids[-keep:]
        self.keep_ckpt_ids = deque(ids)  # (no maxlen: pruned here, after the save)
        runner.message_hub.update_info("keep_ckpt_ids", list(ids))
        self.max_keep_ckpts = -1  # the base class saves without removing anything
        try:
            super()._save_checkpoint_with_step(runner, step, meta)
        finally:
            self.max_keep_ckpts = keep
        if is_main_process():
            for old in stale:
                path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
                if self.file_backend.isfile(path):
                    self.file_backend.remove(path)
                elif self.file_backend.isdir(path):  # a DeepSpeed checkpoint folder
                    self.file_backend.rmtree(path)


def install_atomic_checkpoint_saves() -> None:
    """mmengine writes ``iter_<n>.pth`` in place, so a kill mid-write leaves a truncated file under the
    final name (listed as the newest checkpoint). Runner.save_checkpoint then writes local files to a
    temp name in the same folder and renames it (other backends, e.g. ``s3://``, unchanged)."""
    import mmengine.runner.runner as runner_module

    original = runner_module.save_checkpoint
    if getattr(original, "_atomic", False):
        return

    def save_checkpoint(checkpoint, filename, *args, **kwargs):
        if not isinstance(filename, str) or "://" in filename:
            return original(checkpoint, filename, *args, **kwargs)
        folder, name = os.path.split(os.path.abspath(filename))
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{os.getpid()}_{name}")
        try:
            original(checkpoint, tmp, *args, **kwargs)
            os.replace(tmp, filename)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    save_checkpoint._atomic = True
    runner_module.save_checkpoint = save_checkpoint


def iter_number(name: str) -> int | None:
    """n of an mmengine checkpoint name ``iter_<n>.pth`` (file, or DeepSpeed folder; also ``iter_<n>``)."""
    stem = name[:-4] if name.endswith(".pth") else name
    if stem.startswith("iter_") and stem[5:].isdigit():
        return int(stem[5:])
    return None


def checkpoint_complete(path: str) -> bool:
    """A .pth whose zip directory is intact (a file cut short by a kill during torch.save has none), or a
    DeepSpeed checkpoint folder holding model states whose .pt files all are (DeepSpeed writes the folder
    in place: a kill mid-save leaves it without them, or with one cut short)."""
    if os.path.isdir(path):
        names = os.listdir(path)
        pts = [n for n in names if n.endswith(".pt")]
        return any(n.endswith("model_states.pt") for n in pts) and all(
            _zip_complete(os.path.join(path, n)) for n in pts)
    return os.path.isfile(path) and _zip_complete(path)


def _zip_complete(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def complete_checkpoints(work_dir: str) -> list[str]:
    """Names of the complete ``iter_<n>.pth`` of a work dir (cut-short ones hold nothing to keep), oldest
    first."""
    if not os.path.isdir(work_dir):
        return []
    return sorted((n for n in os.listdir(work_dir)
                   if iter_number(n) is not None and checkpoint_complete(os.path.join(work_dir, n))),
                  key=lambda n: (iter_number(n), n))
