"""Safe loading (issue 7 item 4): a static audit of every deserialisation call in projects/ and tools/,
mmengine checkpoints through weights_only=True + an explicit allow-list, and malicious pickle / torch /
npz files refused by every loader that reads files from outside (nothing in them runs).

Covered elsewhere: the restricted dataset unpickler itself (test_data_readers.py), convert_to_hf's
checkpoint reader (test_export.py), resume from a real mmengine checkpoint (test_robustness_train_kill.py).
"""
from __future__ import annotations

import ast
import os
import pickle

import numpy as np
import pytest
import torch

from projects.sasasa2va.utils.checkpoint import (
    RNGStateHook, _history_buffer_getattr, load_mmengine_checkpoint, mmengine_checkpoint_safe_globals)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS: list = []


def _side_effect(tag):
    CALLS.append(tag)
    return tag


class Evil:
    """Unpickling this calls _side_effect (stands for os.system in a malicious file)."""

    def __reduce__(self):
        return (_side_effect, ("executed",))


class EvilGetattr:
    """getattr(HistoryBuffer, 'update'): a getattr the allow-list must not resolve."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer

        return (getattr, (HistoryBuffer, "update"))


@pytest.fixture(autouse=True)
def _no_calls():
    CALLS.clear()
    yield
    assert CALLS == [], "code from a file was executed"


# ================================================================================================ audit
def _py_files():
    for top in ("projects", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else k.value
    return None


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # x().eval() is not eval()
    return ".".join(reversed(parts))


# Reviewed exceptions: (file relative to the repo, function called) -> the keyword that marks the reviewed
# call; another call of that function in that file is audited like any other.
ALLOWED = {
    # the inert reader: torch.load with a pickle_module whose Unpickler.find_class only resolves torch's
    # weights-only allow-list
    ("projects/sasasa2va/hf/convert_to_hf.py", "torch.load"): "pickle_module",
}


def test_every_deserialisation_call_is_restricted():
    problems, exempted = [], []
    for path in _py_files():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=rel)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{rel}:{node.lineno} {name}"
            marker = ALLOWED.get((rel, name))
            if marker is not None and _kw(node, marker) is not None:
                exempted.append(where)
                continue
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                problems.append(f"{where} without allow_pickle=False")
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load",
                          "torch.jit.load", "marshal.loads"):
                problems.append(where)
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and _kw(node, "Loader") is None:
                problems.append(where)
            elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                problems.append(where)
    assert problems == [], "unrestricted deserialisation / code execution:\n" + "\n".join(problems)
    assert len(exempted) == len(ALLOWED), f"each reviewed exception is one call, found: {exempted}"


# ================================================================================================ mmengine checkpoints
def _mmengine_like_checkpoint():
    from mmengine.logging import MessageHub

    hub = MessageHub(f"test_safe_loading_{os.getpid()}")
    hub.update_scalar("train/loss", np.float64(1.25))
    hub.update_scalar("train/lr", 3e-4)
    hub.update_info("eta", np.float64(12.5))
    hub.update_info("keep_ckpt_ids", [2, 4])
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"meta": {"epoch": 0, "iter": 4, "seed": 0, "cfg": "lr = 1e-3\n", "time": "x"},
            "state_dict": lin.state_dict(), "message_hub": hub.state_dict(), "optimizer": opt.state_dict(),
            "param_schedulers": [{"base_values": [1e-3], "last_step": 4, "by_epoch": False}],
            "rng_state": RNGStateHook.capture()}


def test_mmengine_checkpoint_needs_and_gets_only_the_explicit_allow_list(tmp_path):
    path = str(tmp_path / "iter_4.pth")
    ckpt = _mmengine_like_checkpoint()
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses mmengine's metadata ...
        torch.load(path, weights_only=True)
    got = load_mmengine_checkpoint(path)  # ... the explicit allow-list reads it
    assert got["meta"] == ckpt["meta"] and got["param_schedulers"] == ckpt["param_schedulers"]
    assert all(torch.equal(got["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    buf = got["message_hub"]["log_scalars"]["train/loss"]
    assert buf.current() == 1.25 and buf.statistics("mean") == 1.25
    assert got["message_hub"]["runtime_info"]["eta"] == 12.5
    RNGStateHook.restore(got["rng_state"])
    # mmengine's own loader (torch.load with the default weights_only) works under the allow-list
    from mmengine.runner.checkpoint import _load_checkpoint

    with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):
        assert _load_checkpoint(path, map_location="cpu")["meta"]["iter"] == 4


@pytest.mark.parametrize("payload, pattern", [
    (Evil(), "_side_effect"),
    (EvilGetattr(), "getattr"),
])
def test_malicious_checkpoint_is_refused(tmp_path, payload, pattern):
    path = str(tmp_path / "evil.pth")
    ckpt = _mmengine_like_checkpoint()
    ckpt["meta"]["x"] = payload
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=pattern) as ei:
        load_mmengine_checkpoint(path)
    assert "evil.pth" in str(ei.value)
    from mmengine.runner.checkpoint import _load_checkpoint

    with torch.serialization.safe_globals(mmengine_checkpoint_safe_globals()):  # what a --resume does
        with pytest.raises(pickle.UnpicklingError):
            _load_checkpoint(path, map_location="cpu")
    with pytest.raises(FileNotFoundError):
        load_mmengine_checkpoint(str(tmp_path / "missing.pth"))


def test_restricted_getattr():
    from mmengine.logging import HistoryBuffer

    assert _history_buffer_getattr(HistoryBuffer, "mean") is HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, "__init__"), (os, "system"), (HistoryBuffer, "update")):
        with pytest.raises(pickle.UnpicklingError, match="only getattr"):
            _history_buffer_getattr(obj, name)


# ================================================================================================ other loaders
def test_pretrained_checkpoint_loaders_refuse_code(tmp_path):
    from projects.sasasa2va.models.builder import load_sa2va_pth, load_sam2_checkpoint

    path = str(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_sam2_checkpoint(torch.nn.Module(), path)
    with pytest.raises(pickle.UnpicklingError):
        load_sa2va_pth(torch.nn.Linear(1, 1), path)


def test_probability_files_refuse_object_arrays(tmp_path):
    from projects.sasasa2va.evaluation.averaging import load_probs, probs_path

    path = probs_path(str(tmp_path), "v", "0")
    os.makedirs(os.path.dirname(path))
    np.savez(path, probs=np.array([Evil()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_probs(str(tmp_path), "v", "0")


def test_dataset_pickle_entry_points_refuse_code(tmp_path):
    from projects.sasasa2va.datasets.errors import DataError
    from projects.sasasa2va.datasets.readers import load_mask_dict, read_refcoco

    (tmp_path / "mask_dict.pkl").write_bytes(pickle.dumps({"0": [Evil()]}))
    with pytest.raises(DataError, match="mask_dict.pkl: pickle references .*_side_effect"):
        load_mask_dict(str(tmp_path / "mask_dict.pkl"))
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\).p: pickle references"):
        read_refcoco(str(tmp_path), "refs(unc).p")
