"""Data readers, conversation encoding and training datasets.

Training classes are exported lazily so that importing the package stays light (no torchvision/PIL).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "SaSaSa2VARefVOS": ".refvos",
    "RefTrainingDataset": ".refvos",
    "SaSaSa2VARefSeg": ".refseg",
    "ConcatDatasetWithRepeats": ".concat",
    "sasasa2va_collate_fn": ".collate",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
