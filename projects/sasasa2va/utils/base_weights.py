"""Which base weights a training run started from.

A training checkpoint holds only the trainable tensors; the export (convert_to_hf.py) rebuilds the rest of
the model from the config's ``model.pretrained_pth``. If that file changed after training (e.g. the tiny
checkpoints were regenerated), the export would silently combine the run's tensors with other weights.
tools/train.py therefore records a fingerprint of the file in ``<work_dir>/base_weights.json``, and resume
and export compare it with the file they are about to use.
"""
from __future__ import annotations

import hashlib
import json
import os

from projects.sasasa2va.utils.io import atomic_write_json

BASE_WEIGHTS_FILE = "base_weights.json"
_CHUNK = 8 << 20


def file_fingerprint(path: str) -> str:
    """sha256 of the size and the first and last 8 MiB: cheap for multi-GB files, and any rewrite of a
    checkpoint (new random init, other training) changes its leading tensors."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_CHUNK))
        if size > _CHUNK:
            f.seek(max(_CHUNK, size - _CHUNK))
            h.update(f.read(_CHUNK))
    return h.hexdigest()[:32]


def base_weights(cfg) -> dict:
    """{key: {"path", "fingerprint"}} of the config's base weight files that exist (model.pretrained_pth)."""
    model = cfg.get("model") or {}
    out = {}
    path = model.get("pretrained_pth")
    if isinstance(path, str) and os.path.isfile(path):
        out["pretrained_pth"] = {"path": os.path.abspath(path), "fingerprint": file_fingerprint(path)}
    return out


def record_base_weights(work_dir: str, cfg) -> dict:
    record = base_weights(cfg)
    atomic_write_json(os.path.join(work_dir, BASE_WEIGHTS_FILE), record, indent=1)
    return record


def base_weights_mismatch(work_dir: str, cfg) -> str | None:
    """None when ``work_dir`` has no record or the config's files match it; else what differs."""
    path = os.path.join(work_dir, BASE_WEIGHTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        try:
            recorded = json.load(f)
        except json.JSONDecodeError as exc:
            return f"{path} is unreadable ({exc})"
    now = base_weights(cfg)
    diffs = []
    for key, old in recorded.items():
        new = now.get(key)
        if new is None:
            diffs.append(f"{key} {old.get('path')} is missing now")
        elif new["fingerprint"] != old.get("fingerprint"):
            diffs.append(f"{key} {new['path']} changed since the run started (the run used a file with "
                         f"fingerprint {old.get('fingerprint')}, now {new['fingerprint']})")
    return "; ".join(diffs) or None
