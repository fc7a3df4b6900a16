"""Selective averaging of an expression as soon as its rank has predicted every member mode.

The end-of-run averaging (``runner.average_runs``) reads every member's stored probabilities back,
on rank 0 alone, after all model work: with five modes that is five deflated maps per expression in a
serial tail. A rank that predicted all member modes of an expression in this run already holds their
uint8 maps, so :class:`AverageAhead` averages them right away (on the output writer's threads, while
the model works on) and stores the averaged entry under ``<work_dir>/average/preds``, tagged with the
run's id, the members and the threshold. ``average_runs`` takes such an entry only when all three
match this run (a resumed or re-run job recomputes from the stored files), so results.json is the same
bytes either way. Members are summed in the members' order, exactly as ``average_runs`` does.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from projects.sasasa2va.evaluation.averaging import ensemble_masks
from projects.sasasa2va.evaluation.results_io import make_entry, read_entry
from projects.sasasa2va.utils.io import atomic_write_json

AHEAD_KEY = "average_ahead"  # extra key of a stored entry: {"run", "members", "threshold"}
AHEAD_MEMORY_BYTES = 2 << 30  # bound on the member maps held while an expression waits for its other modes


def ahead_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "average")


def ahead_path(work_dir: str, video_id: str, exp_id: str) -> str:
    return os.path.join(ahead_dir(work_dir), "preds", str(video_id), f"{exp_id}.json")


def failure_error(members: Sequence[str]) -> str:
    return f"every member failed on this expression ({', '.join(members)})"


def averaged_entry(index: int, video_id: str, exp_id: str, frame_names: list[str], exp: str,
                   probs: Sequence[np.ndarray], ok: Sequence[str], members: Sequence[str], threshold: float,
                   hw: tuple[int, int]) -> dict:
    """The results entry of one averaged expression (``average_runs`` builds its entries with this too).

    ``probs``: the maps of the members that stored probabilities, in the members' order; ``ok``: the
    members whose prediction succeeded (none: the averaged expression is failed).
    """
    if probs:
        masks = ensemble_masks(list(probs), threshold=threshold)
    else:
        masks = np.zeros((len(frame_names),) + tuple(hw), dtype=bool)
    status, error = ("ok", None) if ok else ("failed", failure_error(members))
    return make_entry(index, video_id, exp_id, frame_names, masks, text_prediction="", exp=exp,
                      status=status, error=error)


def read_ahead(work_dir: str, video_id: str, exp_id: str, num_frames: int, run_id: str,
               members: Sequence[str], threshold: float) -> Optional[dict]:
    """This run's averaged entry of the expression, without the tag; None if absent, unreadable or
    written by another run, for other members or another threshold."""
    e = read_entry(ahead_path(work_dir, video_id, exp_id), video_id, exp_id, num_frames) if run_id else None
    tag = e.pop(AHEAD_KEY, None) if e is not None else None
    if (not isinstance(tag, dict) or tag.get("run") != run_id or tag.get("members") != list(members)
            or tag.get("threshold") != float(threshold)):
        return None
    return e


@dataclass
class AverageAhead:
    """Collects the member outputs of this rank's expressions; :meth:`add` returns the averaging job of
    an expression once all its members are in (run it on any thread), else None.

    ``members``: the averaged modes, in order (all of them modes of this run); ``run_id``: shared by
    the ranks of one run. Maps are held at most ``memory_bytes`` in total: an expression that would
    exceed it is dropped and averaged at the end from its files, as without this class. Only the
    expressions given to :meth:`expect` (all members pending in this run) are collected.
    """
    work_dir: str
    members: Sequence[str]
    threshold: float
    run_id: str
    memory_bytes: int = AHEAD_MEMORY_BYTES
    _pending: dict = field(default_factory=dict)  # (video, exp) -> {mode: (probs or None, ok)}
    _dropped: set = field(default_factory=set)
    _expected: set = field(default_factory=set)
    _bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, mode: str, index: int, video_id: str, exp_id: str, frame_names: list[str], exp: str,
            probs: Optional[np.ndarray], ok: bool, hw: tuple[int, int]) -> Optional[Callable[[], None]]:
        if mode not in self.members:
            return None
        key = (video_id, exp_id)
        size = int(probs.nbytes) if probs is not None else 0
        with self._lock:
            if key not in self._expected or key in self._dropped:
                return None
            got = self._pending.setdefault(key, {})
            if len(got) + 1 < len(self.members) and self._bytes + size > self.memory_bytes:
                self._drop(key)
                return None
            got[mode] = (probs, bool(ok))
            self._bytes += size
            if len(got) < len(self.members):
                return None
            self._release(key)
        maps = [got[m][0] for m in self.members if got[m][0] is not None]
        ok_members = [m for m in self.members if got[m][1]]

        def job() -> None:
            entry = averaged_entry(index, video_id, exp_id, frame_names, exp, maps, ok_members, self.members,
                                   self.threshold, hw)
            entry[AHEAD_KEY] = {"run": self.run_id, "members": list(self.members),
                                "threshold": float(self.threshold)}
            atomic_write_json(ahead_path(self.work_dir, video_id, exp_id), entry)

        return job

    def expect(self, keys) -> None:
        """(video, exp) keys whose every member mode this rank predicts in this run."""
        with self._lock:
            self._expected.update(keys)

    def _release(self, key) -> None:
        """Stop holding the maps of ``key`` (lock held)."""
        got = self._pending.pop(key, {})
        self._bytes -= sum(int(p.nbytes) for p, _ in got.values() if p is not None)

    def _drop(self, key) -> None:
        self._release(key)
        self._dropped.add(key)

    @property
    def held_bytes(self) -> int:
        return self._bytes
