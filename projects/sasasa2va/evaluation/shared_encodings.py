"""Encode an output array once however many outputs share it.

The shared path returns the SAME read-only arrays for the (mode, expression) outputs that coincide
(``VideoContext`` outputs cache: e.g. wrap_around and wrap_around_plus below 100 frames, uniform,
uniform_plus and wrap_around_plus above, all five modes at 100 frames), so the writer threads deflate
those probabilities and run-length encode those masks once instead of once per mode. Only read-only
arrays are shared: a writable one may change between two uses, so it is encoded every time.
"""
from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future
from typing import Callable, TypeVar

import numpy as np

T = TypeVar("T")

_lock = threading.Lock()
_entries: dict = {}  # (kind, id(array)) -> (weak reference to the array, Future of its encoding)


def encode_once(kind: str, array: np.ndarray, encode: Callable[[np.ndarray], T]) -> T:
    """``encode(array)``, computed once per live read-only ``array`` and ``kind`` (thread-safe: a second
    caller waits for the first one's result). A failure is raised to the callers waiting for it and not
    kept: a later call encodes again. Entries go with their array."""
    if not isinstance(array, np.ndarray) or array.flags.writeable:
        return encode(array)
    key = (kind, id(array))
    with _lock:
        for k in [k for k, (ref, _) in _entries.items() if ref() is None]:  # arrays gone: ids may be reused
            del _entries[k]
        entry = _entries.get(key)
        owner = entry is None or entry[0]() is not array
        if owner:
            entry = _entries[key] = (weakref.ref(array), Future())
    future = entry[1]
    if owner:
        try:
            future.set_result(encode(array))
        except BaseException as err:
            with _lock:
                if _entries.get(key) is entry:
                    del _entries[key]
            future.set_exception(err)
            raise
    return future.result()


def cached_count() -> int:
    """Encodings currently held (of arrays still alive)."""
    with _lock:
        return sum(1 for ref, _ in _entries.values() if ref() is not None)
