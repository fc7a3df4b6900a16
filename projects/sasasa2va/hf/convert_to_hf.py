#!/usr/bin/env python
"""Export a trained SaSaSa2VA checkpoint as a self-contained Hugging Face folder (spec model_training.md §9).

    python projects/sasasa2va/hf/convert_to_hf.py CONFIG --pth-model PTH --save-path HF_DIR
    python projects/sasasa2va/hf/convert_to_hf.py CONFIG PTH [--save-path HF_DIR]       (reference form)
        [--cfg-options KEY=VALUE ...] [--overwrite] [--allow-partial]

Steps: build the training model from the mmengine config exactly as training does (so the base InternVL,
Sa2VA .pth, SAM2 checkpoint and LoRA layout match), load the training checkpoint (mmengine ``.pth``
with the trainable tensors under ``state_dict``, a plain state dict, or a DeepSpeed checkpoint folder),
report what was loaded, merge LoRA and the trained token rows, and save into HF_DIR:

* ``config.json`` — SaSaSa2VAChatConfig, ``architectures=['SaSaSa2VAChatModel']`` and ``auto_map`` so that
  ``AutoModel.from_pretrained(HF_DIR, trust_remote_code=True)`` finds the code in the folder;
* safetensors weights named ``vision_model.*``, ``mlp1.*``, ``language_model.*``,
  ``grounding_encoder.sam2_model.*``, ``text_hidden_fcs.*``;
* the tokenizer with the added special tokens;
* a copy of every ``.py`` of ``projects/sasasa2va/hf/models/`` (the model code, imported by relative
  imports only, so the folder needs nothing from this repo).

The folder is written into a temporary sibling directory and renamed into place at the end, so a
crash never leaves a half-written export under HF_DIR.

Checkpoint loading and trust: a ``.pth`` is first read with ``torch.load(weights_only=True)``. mmengine
checkpoints also pickle non-tensor metadata (message hub history buffers, numpy scalars), which that
refuses; they are then read with :func:`load_pickle_inert`, which only ever calls torch's own
weights-only allow-list (tensor/storage rebuilding, containers, dtypes) and turns every other class or
function named in the file into an inert placeholder — nothing from the file is executed. DeepSpeed
folders are read by DeepSpeed's ``zero_to_fp32`` (which unpickles fully): convert only DeepSpeed
checkpoints you produced.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import pickle
import shutil
import sys
import tempfile
import types
import zipfile
from collections import OrderedDict

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from projects.sasasa2va.utils.io import DIR_MODE  # noqa: E402

MODEL_CODE_DIR = osp.join(osp.dirname(osp.abspath(__file__)), "models")
CONFIG_DIR = osp.join(ROOT, "projects", "sasasa2va", "configs")
AUTO_MAP = {
    "AutoConfig": "configuration_sasasa2va_chat.SaSaSa2VAChatConfig",
    "AutoModel": "modeling_sasasa2va_chat.SaSaSa2VAChatModel",
    "AutoModelForCausalLM": "modeling_sasasa2va_chat.SaSaSa2VAChatModel",
}
EXPECTED_PREFIXES = ("vision_model.", "mlp1.", "language_model.", "grounding_encoder.sam2_model.", "text_hidden_fcs.")


# =============================================================================================== loading
class InertObject:
    """Stand-in for a class or function named in a checkpoint but not on torch's allow-list.

    Calling it, instantiating it or restoring its state only records the arguments; no code from the
    checkpoint runs. ``qualname`` says what the file referred to.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _torch_allowed_globals() -> dict:
    """torch's weights-only allow-list ('module.name' -> object) plus user-registered safe globals."""
    allowed = {}
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        allowed.update(_get_allowed_globals())
        allowed.update(_get_user_allowed_globals())
    except ImportError:  # older/newer torch: the minimum needed for tensors in containers
        import torch._utils as tu

        allowed.update({"collections.OrderedDict": OrderedDict, "torch.Size": torch.Size,
                        "torch._utils._rebuild_tensor_v2": tu._rebuild_tensor_v2,
                        "torch._utils._rebuild_parameter": tu._rebuild_parameter})
        for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"):
            allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


def load_pickle_inert(path: str, map_location="cpu"):
    """torch.load where only allow-listed globals resolve; everything else becomes an InertObject.

    Returns (object, sorted list of the names that were replaced).
    """
    allowed = _torch_allowed_globals()
    replaced: set = set()

    class InertUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            key = f"{module}.{name}"
            if key in allowed:
                return allowed[key]
            replaced.add(key)
            return type(name, (InertObject,), {"qualname": key})

    module = types.SimpleNamespace(__name__="inert_pickle", Unpickler=InertUnpickler,
                                   load=lambda f, **kw: InertUnpickler(f, **kw).load())
    obj = torch.load(path, map_location=map_location, pickle_module=module, weights_only=False)
    return obj, sorted(replaced)


def _state_dict_from(obj, source: str) -> "OrderedDict[str, torch.Tensor]":
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):  # DeepSpeed model-states file
        obj = obj["module"]
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict (optionally under 'state_dict'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: {len(bad)} state-dict entries are not tensors, e.g. {bad[:5]}")
    return OrderedDict(obj)


def load_deepspeed_folder(path: str) -> "OrderedDict[str, torch.Tensor]":
    """A DeepSpeed checkpoint folder (``<work_dir>/iter_N.pth/``) -> fp32 state dict via zero_to_fp32."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise ImportError(f"{path} is a DeepSpeed checkpoint folder, but deepspeed is not importable: {err}") from err
    path = osp.abspath(path.rstrip("/"))
    state = get_fp32_state_dict_from_zero_checkpoint(osp.dirname(path), tag=osp.basename(path))
    return _state_dict_from(state, path)


def load_training_checkpoint(path: str, log=print) -> "OrderedDict[str, torch.Tensor]":
    """Trainable tensors of a training checkpoint (mmengine .pth, plain state dict or DeepSpeed folder)."""
    if osp.isdir(path):
        if not any(n.endswith("model_states.pt") for n in os.listdir(path)):  # ZeRO-3: zero_pp_rank_<r>_mp_...
            from projects.sasasa2va.utils.checkpoint import complete_checkpoints

            found = complete_checkpoints(path)
            hint = f"; its newest complete checkpoint is {osp.join(path, found[-1])}" if found else ""
            raise ValueError(f"{path}: a folder but not a DeepSpeed checkpoint folder (no "
                             f"*model_states.pt){hint}")
        log(f"[convert_to_hf] {path}: DeepSpeed checkpoint folder (zero_to_fp32)")
        return load_deepspeed_folder(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save's zip archive (its end record is written last), or ...
        try:  # ... the legacy format (_use_new_zipfile_serialization=False): tensors only
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a training checkpoint (not a torch.save file, or cut short: "
                             f"{type(exc).__name__}: {exc})") from None
        return _state_dict_from(obj, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj, replaced = load_pickle_inert(path)
        log(f"[convert_to_hf] {path}: has non-tensor metadata; read without executing it "
            f"({len(replaced)} names left inert, e.g. {replaced[:3]})")
    except RuntimeError as exc:  # e.g. a damaged archive member
        raise ValueError(f"{path}: not a readable training checkpoint ({exc})") from None
    return _state_dict_from(obj, path)


# =============================================================================================== building
def resolve_config_path(config: str) -> str:
    """A path, or the name of a config in projects/sasasa2va/configs (with or without .py)."""
    if osp.isfile(config):
        return config
    for cand in (osp.join(CONFIG_DIR, config), osp.join(CONFIG_DIR, config + ".py")):
        if osp.isfile(cand):
            return cand
    raise FileNotFoundError(f"config not found: {config} (neither a file nor a config name in {CONFIG_DIR})")


def build_training_model(config: str, cfg_options: dict | None = None):
    """The mmengine training model of ``config``, built like tools/train.py's runner builds it."""
    from mmengine.registry import MODELS

    from projects.sasasa2va.utils.tool_inputs import load_tool_config

    cfg = load_tool_config(resolve_config_path(config), cfg_options, required=("model",))
    return MODELS.build(cfg.model), cfg


def check_shapes(state, model, pth: str, config: str) -> None:
    """A checkpoint tensor whose shape differs from the model's is named with both shapes (torch's
    load_state_dict raises a bare 'size mismatch'); the usual cause is a checkpoint of another config."""
    own = model.all_state_dict() if hasattr(model, "all_state_dict") else model.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{pth}: tensor {key} has shape {tuple(tensor.shape)} in the checkpoint but "
                             f"{tuple(own[key].shape)} in the model built from {config}: a checkpoint of another "
                             f"config (architecture, image size, vocabulary)?")


# =============================================================================================== saving
def default_save_path(pth: str) -> str:
    """Reference default: ``<dirname(pth)>_<stem>_hf`` (e.g. work_dirs/x/iter_3.pth -> work_dirs/x_iter_3_hf)."""
    path = osp.normpath(pth.rstrip("/"))
    stem = osp.splitext(osp.basename(path))[0]
    parent = osp.dirname(path)
    return f"{parent}_{stem}_hf" if parent else f"{stem}_hf"


def prepare_export_config(chat, tokenizer) -> None:
    """architectures / auto_map / vocab size on the chat config before saving."""
    config = chat.config
    rows = chat.language_model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(f"the LLM embedding has {rows} rows but the tokenizer has {len(tokenizer)} tokens")
    config.llm_config.vocab_size = rows  # == len(tokenizer) after add_special_tokens' resize
    config.architectures = ["SaSaSa2VAChatModel"]
    config.auto_map = dict(AUTO_MAP)
    for name in ("seg_token_id", "img_context_token_id"):
        if getattr(config, name) is None:
            raise ValueError(f"the chat config has no {name}; was add_special_tokens applied?")
    if not config.template:
        raise ValueError("the chat config has no template")


def copy_model_code(dest: str, source: str = MODEL_CODE_DIR) -> list:
    """Copy every .py of the model package (the remote code of the export); returns the names."""
    names = sorted(n for n in os.listdir(source) if n.endswith(".py"))
    for name in names:
        shutil.copy2(osp.join(source, name), osp.join(dest, name))
    return names


def check_save_path(save_path: str, overwrite: bool, inputs=()) -> None:
    """--save-path may be new, or (with --overwrite) an earlier export -- never another folder or file
    (e.g. a training work dir), nor one holding an input of this export."""
    save_path = osp.abspath(save_path)
    if not osp.exists(save_path):
        return
    if not overwrite:
        raise FileExistsError(f"{save_path} exists; pass --overwrite to replace it")
    if not osp.isdir(save_path):
        raise ValueError(f"{save_path}: exists and is not a folder; --overwrite replaces only an earlier export")
    for path in inputs:
        if path and osp.commonpath([save_path, osp.abspath(path)]) == save_path:
            raise ValueError(f"{save_path}: holds {path}, an input of this export; choose another --save-path")
    names = set(os.listdir(save_path))
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{save_path}: not an earlier export (no config.json + *.safetensors); --overwrite "
                         f"replaces only exports, choose another --save-path")


def recover_cut_short_saves(save_path: str, log=print) -> None:
    """Undo what a save killed midway left beside ``save_path`` (no except clause runs on SIGKILL): its
    partial ``.<name>.tmp-*`` folder is removed, and an earlier export moved aside as ``.<name>.old-*`` is
    renamed back when ``save_path`` itself is missing (killed between the two renames), else removed."""
    parent, base = osp.dirname(save_path), osp.basename(save_path)
    if not osp.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        path = osp.join(parent, name)
        if name.startswith(f".{base}.tmp-") and osp.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            log(f"[convert_to_hf] removed {path} (an export cut short)")
        elif name.startswith(f".{base}.old-") and osp.isdir(path):
            if not osp.exists(save_path):
                os.rename(path, save_path)
                log(f"[convert_to_hf] {save_path}: the earlier export is back (a replacement was cut short)")
            else:
                shutil.rmtree(path, ignore_errors=True)


def save_hf_folder(chat, tokenizer, save_path: str, overwrite: bool = False, log=print) -> str:
    """Write the export folder atomically (temp sibling dir, then rename); returns the absolute path."""
    save_path = osp.abspath(save_path)
    recover_cut_short_saves(save_path, log)
    check_save_path(save_path, overwrite)
    names = list(chat.state_dict())
    odd = [k for k in names if not k.startswith(EXPECTED_PREFIXES)]
    if odd:
        raise ValueError(f"unexpected parameter names in the chat model (LoRA not merged?): {odd[:10]}")
    prepare_export_config(chat, tokenizer)
    parent = osp.dirname(save_path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{osp.basename(save_path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, DIR_MODE)  # the final folder is this one, renamed: readable as a makedirs folder is
        chat.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        code = copy_model_code(tmp)
        if osp.exists(save_path):
            old = tempfile.mkdtemp(prefix=f".{osp.basename(save_path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(save_path, old)
            os.rename(tmp, save_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in chat.parameters())
    dtype = next(chat.parameters()).dtype
    log(f"[convert_to_hf] saved {len(names)} tensors ({n_params:,} parameters, {dtype}), the tokenizer "
        f"({len(tokenizer)} tokens) and {len(code)} code files to {save_path}")
    return save_path


# =============================================================================================== main
def convert(config: str, pth: str, save_path: str | None = None, cfg_options: dict | None = None,
            overwrite: bool = False, allow_partial: bool = False, allow_base_mismatch: bool = False,
            log=print) -> str:
    """Config + training checkpoint -> HF folder; returns its absolute path."""
    from projects.sasasa2va.utils.base_weights import base_weights_mismatch

    save_path = save_path or default_save_path(pth)
    check_save_path(save_path, overwrite, inputs=(pth, config))
    state = load_training_checkpoint(pth, log=log)
    model, cfg = build_training_model(config, cfg_options)
    problem = base_weights_mismatch(osp.dirname(osp.abspath(pth.rstrip("/"))), cfg)
    if problem:
        msg = (f"{pth}: the run's base weights differ from the ones the export would build on: {problem} (the "
               f"checkpoint holds only the trained tensors)")
        if not allow_base_mismatch:
            raise ValueError(msg + "; --allow-base-mismatch exports anyway")
        log(f"[convert_to_hf] WARNING (--allow-base-mismatch): {msg}")
    check_shapes(state, model, pth, config)
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a reference-layout key (mllm.model.*) of another shape: check_shapes' names miss it
        if "size mismatch" not in str(exc):
            raise
        raise ValueError(f"{pth}: tensors of another shape than the model built from {config} (a checkpoint of "
                         f"another config?): {str(exc).strip()}") from None
    report = getattr(model, "last_load_report", None) or {}
    loaded = report.get("loaded", [])
    groups = ", ".join(f"{g}: {n}" for g, n in report.get("groups", {}).items()) or "none"
    log(f"[convert_to_hf] {pth}: loaded {len(loaded)} of {len(state)} tensors ({groups})")
    problems = []
    if not loaded:
        problems.append("no tensor of the checkpoint matches the model built from the config")
    if report.get("missing"):
        problems.append(f"{len(report['missing'])} trainable tensors are missing from the checkpoint, "
                        f"e.g. {report['missing'][:5]}")
    if report.get("unexpected"):
        problems.append(f"{len(report['unexpected'])} checkpoint tensors do not exist in the model, "
                        f"e.g. {report['unexpected'][:5]}")
    if problems:
        msg = f"{pth} does not fit {config}: " + "; ".join(problems)
        if allow_partial and loaded:
            log(f"[convert_to_hf] WARNING (--allow-partial): {msg}")
        else:
            raise ValueError(msg + " (wrong config? --allow-partial exports anyway)")
    chat, tokenizer = model.export_chat_model()
    return save_hf_folder(chat, tokenizer, save_path, overwrite=overwrite, log=log)


def build_parser() -> argparse.ArgumentParser:
    from projects.sasasa2va.utils.cli import CfgOptionsAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config (path, or a name in projects/sasasa2va/configs)")
    p.add_argument("pth", nargs="?", default=None, help="training checkpoint (same as --pth-model)")
    p.add_argument("--pth-model", "--pth_model", dest="pth_model", default=None,
                   help="training checkpoint: mmengine .pth, plain state dict, or a DeepSpeed folder")
    p.add_argument("--save-path", "--save_path", dest="save_path", default=None,
                   help="output folder (default: <dirname(pth)>_<stem>_hf beside the checkpoint's folder, e.g. work_dirs/x/iter_3.pth -> work_dirs/x_iter_3_hf)")
    p.add_argument("--cfg-options", nargs="+", action=CfgOptionsAction, help="override config entries, key=value")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-partial", action="store_true",
                   help="export even if trainable tensors are missing or the checkpoint has unknown tensors")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="export even if the config's pretrained_pth changed since the run (its base_weights.json)")
    return p


def main(argv=None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pth and args.pth_model and args.pth != args.pth_model:
        parser.error(f"two different checkpoints given: {args.pth} and --pth-model {args.pth_model}")
    pth = args.pth_model or args.pth
    if not pth:
        parser.error("no checkpoint given: pass --pth-model PTH (or PTH after the config)")
    return convert(args.config, pth, args.save_path, cfg_options=args.cfg_options, overwrite=args.overwrite,
                   allow_partial=args.allow_partial, allow_base_mismatch=args.allow_base_mismatch)


if __name__ == "__main__":
    from projects.sasasa2va.utils.cli import run_reporting_user_errors

    sys.exit(run_reporting_user_errors(main))
