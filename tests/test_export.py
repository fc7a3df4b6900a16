"""convert_to_hf: config + training checkpoint -> HF folder that loads with and without remote code.

The remote-code load runs in a fresh subprocess (its own transformers module cache) and must give the
same masks as the in-memory model for all five modes. A random LLM emits arbitrary text, so both sides
install the same scripted LM head (see tests/test_inference.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_relative_imports

from projects.sasasa2va.hf import convert_to_hf as conv
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import SaSaSa2VAChatModel
from projects.sasasa2va.hf.models.templates import eval_prompt
from projects.sasasa2va.models.tiny import make_tiny_for_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "projects", "sasasa2va", "configs", "sasasa2va_tiny.py")
CODE_DIR = os.path.join(ROOT, "projects", "sasasa2va", "hf", "models")
LORA = {"model.lora": dict(_delete_=True, r=4, lora_alpha=8, lora_dropout=0.0), "model.freeze_vision": True,
        "model.freeze_llm": True, "model.train_sam2_encoder": False, "model.train_embeddings": "new",
        "model.num_points": 256}
MODES = ["uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus"]
ANSWER_STOP = "<|im_end|>"  # the tiny config's template is qwen_chat


# ============================================================================ model code is self-contained
def test_model_code_is_self_contained_and_loadable_as_remote_code():
    """Every sibling is a first-level relative import of the model/config file (transformers copies
    only those for a local folder), the import graph has no cycle (transformers' resolver loops
    forever on one), and nothing imports this repo by absolute name."""
    modules = {f[:-3] for f in os.listdir(CODE_DIR) if f.endswith(".py") and f != "__init__.py"}
    graph = {m: set(get_relative_imports(os.path.join(CODE_DIR, m + ".py"))) for m in modules}
    assert all(deps <= modules for deps in graph.values()), graph
    first_level = graph["modeling_sasasa2va_chat"] | graph["configuration_sasasa2va_chat"] | {
        "modeling_sasasa2va_chat", "configuration_sasasa2va_chat"}
    assert modules <= first_level, sorted(modules - first_level)
    state: dict = {}

    def visit(node, stack):
        if state.get(node) == "done":
            return
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        for dep in graph[node]:
            visit(dep, stack + [node])
        state[node] = "done"

    for m in modules:
        visit(m, [])
    for m in modules:
        with open(os.path.join(CODE_DIR, m + ".py"), encoding="utf-8") as f:
            src = f.read()
        assert "from projects" not in src and "import projects" not in src, m


# ============================================================================ checkpoint loading
CALLS = []


def _side_effect(tag):
    CALLS.append(tag)
    return tag


class Dangerous:
    """Unpickling this would call _side_effect (stands for arbitrary code in a malicious file)."""

    def __reduce__(self):
        return (_side_effect, ("executed",))


def test_checkpoint_loading_is_inert_for_metadata(tmp_path):
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer()
    buf.update(1.5)
    state = {"model.text_hidden_fcs.0.weight": torch.randn(3, 3)}
    torch.save({"state_dict": state, "meta": {"iter": np.int64(3), "x": Dangerous()},
                "message_hub": {"log": buf}}, tmp_path / "ckpt.pth")
    logs = []
    out = conv.load_training_checkpoint(str(tmp_path / "ckpt.pth"), log=logs.append)
    assert list(out) == list(state) and torch.equal(out["model.text_hidden_fcs.0.weight"], state["model.text_hidden_fcs.0.weight"])
    assert CALLS == [] and "non-tensor metadata" in logs[0]
    obj, replaced = conv.load_pickle_inert(str(tmp_path / "ckpt.pth"))
    assert isinstance(obj["meta"]["x"], conv.InertObject) and CALLS == []
    assert any(name.endswith("_side_effect") for name in replaced)
    torch.save(state, tmp_path / "plain.pth")  # plain state dict: weights_only=True works directly
    logs.clear()
    assert list(conv.load_training_checkpoint(str(tmp_path / "plain.pth"), log=logs.append)) == list(state)
    assert logs == []
    torch.save({"state_dict": {"a": 1}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not tensors"):
        conv.load_training_checkpoint(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError):
        conv.load_training_checkpoint(str(tmp_path / "missing.pth"))


def test_deepspeed_folder_goes_through_zero_to_fp32(tmp_path, monkeypatch):
    import deepspeed.utils.zero_to_fp32 as zero  # a pinned dependency: its absence is a failure, not a skip
    seen = {}

    def fake(checkpoint_dir, tag=None, **kw):
        seen.update(dir=checkpoint_dir, tag=tag)
        return {"model.mlp1.1.weight": torch.ones(2)}

    monkeypatch.setattr(zero, "get_fp32_state_dict_from_zero_checkpoint", fake)
    folder = tmp_path / "work" / "iter_7.pth"
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")  # ZeRO-3's name (ZeRO-2: mp_rank_00_...)
    out = conv.load_training_checkpoint(str(folder) + "/", log=lambda *a: None)
    assert list(out) == ["model.mlp1.1.weight"]
    assert seen == {"dir": str(tmp_path / "work"), "tag": "iter_7.pth"}


def test_checkpoint_and_save_path_mistakes_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth: not a training checkpoint"):
        conv.load_training_checkpoint(str(work / "notes.pth"))
    torch.save({"state_dict": {"a": torch.ones(4)}}, work / "iter_20.pth")
    (work / "iter_3.pth").write_bytes((work / "iter_20.pth").read_bytes()[:30])  # cut short
    with pytest.raises(ValueError, match="iter_3.pth: not a training checkpoint"):
        conv.load_training_checkpoint(str(work / "iter_3.pth"))
    torch.save({"state_dict": {"b": torch.ones(3)}}, work / "legacy.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(conv.load_training_checkpoint(str(work / "legacy.pth"))["b"], torch.ones(3))
    os.remove(work / "legacy.pth")
    (work / "iter_30.pth").write_bytes((work / "iter_20.pth").read_bytes()[:30])  # newest, but cut short
    with pytest.raises(ValueError, match=r"not a DeepSpeed checkpoint folder .*newest complete checkpoint is "
                                         r".*iter_20\.pth"):
        conv.load_training_checkpoint(str(work))
    # --overwrite replaces only an earlier export, never a work dir, a file or a folder holding the input
    conv.check_save_path(str(tmp_path / "new"), overwrite=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        conv.check_save_path(str(work), overwrite=False)
    with pytest.raises(ValueError, match="holds .*iter_20.pth, an input"):
        conv.check_save_path(str(work), overwrite=True, inputs=(str(work / "iter_20.pth"),))
    with pytest.raises(ValueError, match="not an earlier export"):
        conv.check_save_path(str(work), overwrite=True, inputs=(str(tmp_path / "elsewhere.pth"),))
    with pytest.raises(ValueError, match="not a folder"):
        conv.check_save_path(str(work / "notes.pth"), overwrite=True)
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    conv.check_save_path(str(export), overwrite=True, inputs=(str(work / "iter_20.pth"),))
    assert sorted(os.listdir(work)) == ["iter_20.pth", "iter_3.pth", "iter_30.pth", "notes.pth"]  # nothing touched
    r = subprocess.run([sys.executable, os.path.join(ROOT, "projects", "sasasa2va", "hf", "convert_to_hf.py"),
                        TINY_CONFIG, "--pth-model", str(work / "iter_20.pth"), "--save-path", str(work),
                        "--overwrite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "an input of this export" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(work)) == ["iter_20.pth", "iter_3.pth", "iter_30.pth", "notes.pth"]


def test_a_killed_export_is_cleaned_up_and_the_earlier_one_comes_back(tmp_path):
    """SIGKILL runs no except clause: the next save removes the partial .<name>.tmp-* folder and, when it
    was killed between its two renames, renames the earlier export (.<name>.old-*) back."""
    hf = tmp_path / "hf"
    partial, earlier = tmp_path / ".hf.tmp-abc", tmp_path / ".hf.old-def"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut")
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    (tmp_path / ".other.tmp-x").mkdir()  # another export's: left alone
    logs = []
    conv.recover_cut_short_saves(str(hf), log=logs.append)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-x", "hf"] and (hf / "config.json").read_text() == "{}"
    assert any("earlier export is back" in m for m in logs)
    earlier.mkdir()  # an export that was replaced, its old copy left over: removed
    conv.recover_cut_short_saves(str(hf), log=logs.append)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-x", "hf"]


def test_cli_arguments_and_default_save_path(capsys):
    assert conv.default_save_path("work_dirs/tiny/iter_3.pth") == "work_dirs/tiny_iter_3_hf"
    assert conv.default_save_path("iter_3.pth") == "iter_3_hf"
    args = conv.build_parser().parse_args(["cfg.py", "a.pth", "--save-path", "out", "--cfg-options", "model.x=1"])
    assert args.pth == "a.pth" and args.save_path == "out" and args.cfg_options == {"model.x": 1}
    assert conv.build_parser().parse_args(["cfg.py", "--pth-model", "b.pth"]).pth_model == "b.pth"
    for argv, message in ((["cfg.py", "a.pth", "--pth-model", "b.pth"], "error: two different"),
                          (["cfg.py"], "error: no checkpoint")):
        with pytest.raises(SystemExit) as exc:  # usage errors
            conv.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert conv.resolve_config_path("sasasa2va_tiny") == TINY_CONFIG


# ============================================================================ config-driven export
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_root")
    make_tiny_for_config(str(root / "pretrained" / "tiny"), TINY_CONFIG)
    return root


@pytest.fixture
def in_root(tiny_root, monkeypatch):
    monkeypatch.chdir(tiny_root)
    return tiny_root


def _trained_checkpoint(path, cfg_options):
    """A training model with non-trivial trainable tensors, saved the way mmengine saves checkpoints."""
    from mmengine.logging import HistoryBuffer

    torch.manual_seed(0)
    model, _ = conv.build_training_model(TINY_CONFIG, cfg_options)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        sam2 = model.model.grounding_encoder.sam2_model
        if sam2.pred_obj_scores:  # object present almost always -> non-trivial masks
            sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(3.0)
    buf = HistoryBuffer()
    buf.update(0.5)
    torch.save({"meta": {"iter": 3, "seed": np.int64(0)}, "state_dict": model.state_dict(),
                "message_hub": {"log_scalars": {"loss": buf}}}, path)
    return model


def export_tiny(root) -> str:
    """Tiny checkpoints under ``root``/pretrained/tiny, a trained-like checkpoint, and its HF export
    (``root``/hf, returned). The tiny config names pretrained/tiny relative to the working directory."""
    make_tiny_for_config(str(root / "pretrained" / "tiny"), TINY_CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _trained_checkpoint(str(root / "ckpt.pth"), None)
        return conv.convert(TINY_CONFIG, str(root / "ckpt.pth"), str(root / "hf"), log=lambda *a: None)
    finally:
        os.chdir(cwd)


def _exported_in_memory(pth, cfg_options):
    model, _ = conv.build_training_model(TINY_CONFIG, cfg_options)
    model.load_state_dict(conv.load_training_checkpoint(pth, log=lambda *a: None))
    return model.export_chat_model()


def test_convert_lora_checkpoint_and_reload_without_remote_code(in_root):
    pth = str(in_root / "ckpt_lora.pth")
    trained = _trained_checkpoint(pth, LORA)
    trainable = trained.state_dict()
    logs = []
    out = conv.convert(TINY_CONFIG, pth, str(in_root / "hf_lora"), cfg_options=LORA, log=logs.append)
    assert out == str(in_root / "hf_lora") and any(f"loaded {len(trainable)} of {len(trainable)}" in m for m in logs)
    assert any("saved" in m and out in m for m in logs)
    assert not [n for n in os.listdir(in_root) if n.startswith(".hf_lora")]  # no temp folder left
    files = set(os.listdir(out))
    code = {f for f in os.listdir(CODE_DIR) if f.endswith(".py")}
    assert code <= files and {"config.json", "model.safetensors", "tokenizer_config.json"} <= files
    for name in code:
        with open(os.path.join(CODE_DIR, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg["architectures"] == ["SaSaSa2VAChatModel"] and cfg["model_type"] == "sasasa2va_chat"
    assert cfg["auto_map"] == conv.AUTO_MAP and cfg["template"] == "qwen_chat"
    assert cfg["seg_token_id"] == tok.convert_tokens_to_ids("[SEG]")
    assert cfg["img_context_token_id"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert cfg["llm_config"]["vocab_size"] == len(tok)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(conv.EXPECTED_PREFIXES) for k in keys) and not any("lora" in k for k in keys)
    assert any(k.startswith("grounding_encoder.sam2_model.memory_encoder.") and k.endswith("g_weight") for k in keys)
    reloaded = SaSaSa2VAChatModel.from_pretrained(out)
    chat, _ = _exported_in_memory(pth, LORA)
    ref = chat.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    # the LoRA delta really reached the exported weights
    base_q = next(p for n, p in trained.named_parameters() if n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    assert not torch.equal(base_q, got["language_model.model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(FileExistsError):
        conv.convert(TINY_CONFIG, pth, out, cfg_options=LORA, log=lambda *a: None)
    with pytest.raises(ValueError, match="does not fit"):  # LoRA tensors unknown to the plain tiny config
        conv.convert(TINY_CONFIG, pth, str(in_root / "hf_bad"), log=lambda *a: None)
    assert not os.path.exists(in_root / "hf_bad")
    # the reference layout (mllm.model.*) with a tensor of another shape: named with the file, not a bare
    # RuntimeError from load_state_dict
    key = next(k for k in trainable if k.startswith("model.text_hidden_fcs.") and k.endswith("weight"))
    ref_pth = str(in_root / "ref_layout.pth")
    torch.save({"state_dict": {key[len("model."):]: torch.zeros(3, 5)}}, ref_pth)
    with pytest.raises(ValueError, match=r"(?s)ref_layout.pth: tensors of another shape than the model built from "
                                         r".*size mismatch for .*text_hidden_fcs"):
        conv.convert(TINY_CONFIG, ref_pth, str(in_root / "hf_ref"), cfg_options=LORA, log=lambda *a: None)
    assert not os.path.exists(in_root / "hf_ref")


SUBPROCESS = r"""
import json, sys, numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer
args = json.loads(sys.argv[1])
model = AutoModel.from_pretrained(args["dir"], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(args["dir"])
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__

class Head(torch.nn.Module):
    def __init__(self, script, vocab):
        super().__init__(); self.script, self.vocab, self.step = script, vocab, 0
    def forward(self, h):
        out = torch.zeros(h.shape[0], self.vocab, dtype=h.dtype)
        out[:, self.script[min(self.step, len(self.script) - 1)]] = 1.0; self.step += 1; return out

head = Head(args["script"], len(tok)); model.language_model.lm_head = head
orig = model.generate_answer
def generate_answer(*a, **k):
    head.step = 0; return orig(*a, **k)
model.generate_answer = generate_answer
out = {}
for name, video in args["videos"].items():
    rng = np.random.default_rng(video["seed"])
    frames = [Image.fromarray(rng.integers(0, 256, (video["h"], video["w"], 3), dtype=np.uint8))
              for _ in range(video["n"])]
    for mode in video["modes"]:
        r = model.predict_forward(video=frames, text=args["text"], tokenizer=tok, mode=mode,
                                  selected_fids=video["fids"] if mode == "q_frame" else None, return_probs=True)
        out[f"{name}/{mode}/masks"] = r["prediction_masks"][0]
        out[f"{name}/{mode}/probs"] = r["probabilities"][0]
np.savez(args["out"], **out)
print("remote-code module:", type(model).__module__)
"""


def _install_script(model, tok):
    """Scripted LM head (tests/test_inference.py) on ``model``; returns the head."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_inference import install_scripted_head

    return install_scripted_head(model, tok)


def test_remote_code_export_in_fresh_process_gives_identical_masks(in_root, tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_inference import set_answer

    pth = str(in_root / "ckpt_remote.pth")
    _trained_checkpoint(pth, LORA)
    out_dir = conv.convert(TINY_CONFIG, pth, str(in_root / "hf_remote"), cfg_options=LORA, log=lambda *a: None)
    chat, tok = _exported_in_memory(pth, LORA)
    # Weights read back from safetensors sit at other memory alignments than freshly merged ones, and the
    # CPU GEMV kernels of the decode steps round differently for them (~1e-6). So the remote-code result
    # must equal the repo class loaded from the same folder bit for bit, and the in-memory model up to that.
    loaded = SaSaSa2VAChatModel.from_pretrained(out_dir)
    set_answer(_install_script(chat, tok), tok, 10, stop=ANSWER_STOP)
    head = _install_script(loaded, tok)
    set_answer(head, tok, 10, stop=ANSWER_STOP)
    rng = np.random.default_rng(3)
    videos = {
        "short": dict(n=12, h=20, w=28, seed=1, modes=MODES,
                      fids=sorted(list(range(12)) + rng.choice(12, 88).tolist())),
        "long": dict(n=102, h=18, w=24, seed=2, modes=["wrap_around"], fids=None),  # Path C
    }
    text = eval_prompt("the red square")
    args = dict(dir=out_dir, script=head.script, text=text, videos=videos, out=str(tmp_path / "remote.npz"))
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS, json.dumps(args)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert os.path.isfile(tmp_path / "hf_modules" / "transformers_modules" / "hf_remote" / "video_context.py")
    remote = np.load(tmp_path / "remote.npz")
    for name, video in videos.items():
        rng = np.random.default_rng(video["seed"])
        frames = [Image.fromarray(rng.integers(0, 256, (video["h"], video["w"], 3), dtype=np.uint8))
                  for _ in range(video["n"])]
        for mode in video["modes"]:
            kw = dict(video=frames, text=text, tokenizer=tok, mode=mode, return_probs=True,
                      selected_fids=video["fids"] if mode == "q_frame" else None)
            r = loaded.predict_forward(**kw)
            assert r["status"] == "ok" and r["num_seg"] == 10
            masks, probs = r["prediction_masks"][0], r["probabilities"][0]
            assert masks.shape == (video["n"], video["h"], video["w"]) and 0 < masks.mean() < 1
            assert np.array_equal(remote[f"{name}/{mode}/masks"], masks), (name, mode)
            assert np.array_equal(remote[f"{name}/{mode}/probs"], probs), (name, mode)
            mem = chat.predict_forward(**kw)
            np.testing.assert_allclose(mem["probabilities"][0], probs, atol=1e-5)
            clear = np.abs(probs - 0.5) > 1e-5
            assert np.array_equal(mem["prediction_masks"][0][clear], masks[clear]), (name, mode)


def test_command_line_from_another_directory(in_root):
    """The documented command, run as a script (not imported), with the reference's positional PTH."""
    pth = str(in_root / "ckpt_plain.pth")
    _trained_checkpoint(pth, {"model.num_points": 256})
    script = os.path.join(ROOT, "projects", "sasasa2va", "hf", "convert_to_hf.py")
    cmd = [sys.executable, script, TINY_CONFIG, pth, "--save-path", "hf_cli", "--cfg-options", "model.num_points=256"]
    proc = subprocess.run(cmd, cwd=str(in_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = str(in_root / "hf_cli")
    assert f"to {out}" in proc.stdout and "non-tensor metadata" in proc.stdout
    from projects.sasasa2va.utils.io import DIR_MODE

    assert os.stat(out).st_mode & 0o777 == DIR_MODE  # as a makedirs folder, not mkdtemp's 0700
    model = SaSaSa2VAChatModel.from_pretrained(out)
    assert model.config.template == "qwen_chat" and model.config.architectures == ["SaSaSa2VAChatModel"]
