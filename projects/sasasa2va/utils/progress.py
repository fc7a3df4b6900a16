"""Progress bars of the long CPU passes over a split (scoring, averaging, writing and checking PNGs)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(enabled: bool, total, desc: str, unit: str = "exp"):
    """A tqdm bar on stderr (closed on the way out, errors included), or None when not ``enabled``."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def counted(bar, item):
    """``item``, after one step of ``bar`` (None: no bar) -- for counting inside comprehensions."""
    if bar is not None:
        bar.update(1)
    return item
