"""Training model, configs and launch (spec model_training.md §3, §6-8) on the tiny model + tiny synthetic data.

Everything runs inside a tmp folder laid out like the repo root (data/synthetic, pretrained/tiny), so the
tiny config is used with its own relative paths.
"""
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config

from projects.sasasa2va.datasets.collate import sasasa2va_collate_fn
from projects.sasasa2va.datasets.refvos import build_object
from projects.sasasa2va.datasets.synthetic import generate_all
from projects.sasasa2va.models.tiny import make_tiny_for_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "projects", "sasasa2va", "configs")
TINY_CONFIG = os.path.join(CONFIG_DIR, "sasasa2va_tiny.py")
SMALL_DATA = dict(num_train_videos=2, num_valid_u_videos=0, num_valid_videos=0, num_revos_videos=1,
                  num_rvos_videos=1, num_sav_videos=1, num_images=2, min_frames=5, max_frames=12)
# cfg-options for short launcher runs on SMALL_DATA (11 items per epoch with one process)
RUN_OPTIONS = ["default_hooks.logger.interval=1", "param_scheduler.0.end=0.2", "param_scheduler.1.begin=0.2",
               "train_cfg.max_epochs=None", "auto_prepare.stand_in_pretraining.steps=1",
               "auto_prepare.stand_in_pretraining.accumulate=1"]
# Heads whose outputs only feed the (non-differentiable) mask choice: trainable, yet never get a gradient
# (reference §1.8 "Consequences").
NO_GRAD_HEADS = ("iou_prediction_head", "pred_obj_score_head")


@pytest.fixture(scope="module")
def workroot(tmp_path_factory):
    """A folder with data/synthetic (small) and pretrained/tiny, like the repo root after auto-prepare."""
    root = tmp_path_factory.mktemp("train_root")
    generate_all(str(root / "data" / "synthetic"), seed=0, **SMALL_DATA)
    make_tiny_for_config(str(root / "pretrained" / "tiny"), TINY_CONFIG)
    return root


@pytest.fixture
def in_root(workroot, monkeypatch):
    """cwd = workroot; one intra-op thread (far faster than 2 on a busy 2-core machine), restored after."""
    monkeypatch.chdir(workroot)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield workroot
    torch.set_num_threads(threads)


def tiny_cfg(**model_overrides):
    cfg = Config.fromfile(TINY_CONFIG)
    cfg.model.update(num_points=256, **model_overrides)
    return cfg


def build_model(cfg):
    from mmengine.registry import MODELS

    torch.manual_seed(0)
    return MODELS.build(cfg.model)


def make_batch(cfg, indices=(4, 0)):
    """Collated batch of the first sample of each config dataset (4 = MeViS video, 0 = RefCOCO image)."""
    samples = [build_object(cfg.train_dataloader.dataset.datasets[i])[0] for i in indices]
    return sasasa2va_collate_fn(samples)


def forward(model, batch):
    data = model.data_preprocessor(batch, True)
    return model(**data, mode="loss")


def total(losses):
    return sum(v for k, v in losses.items() if "loss" in k)


# ----------------------------------------------------------------------------------------- model
def test_forward_losses_and_gradients_on_trainable_parts_only(in_root):
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg)
    data = batch["data"]
    assert data["frames_per_batch"] == [10, 1] and len(data["g_pixel_values"]) == 11
    losses = forward(model, batch)
    assert set(losses) == {"loss_mask", "loss_dice", "llm_loss"}
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values())
    total(losses).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif any(h in name for h in NO_GRAD_HEADS):
            assert p.grad is None, name
        else:
            assert p.grad is not None, f"trainable {name} got no gradient"
    assert torch.isfinite(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])).all()


def test_lora_model_trains_only_the_intended_parts(in_root):
    cfg = tiny_cfg(lora=dict(r=4, lora_alpha=8, lora_dropout=0.0), freeze_vision=True, freeze_llm=True,
                   train_sam2_encoder=False, train_embeddings="new", train_mlp1=True)
    model = build_model(cfg)
    groups = model.parameter_summary()
    for frozen in ("vision_model", "LLM", "SAM2 image encoder", "SAM2 other"):
        assert groups[frozen][0] == 0, frozen
    for trained in ("LLM LoRA", "mlp1", "SAM2 mask decoder", "text_hidden_fcs", "new-token rows"):
        assert groups[trained][0] > 0, trained
    losses = forward(model, make_batch(cfg))
    total(losses).backward()
    emb = model.model.language_model.get_input_embeddings().weight
    assert emb.grad is None and not emb.requires_grad
    assert model.new_tokens.embed.grad is not None and model.new_tokens.head.grad is not None
    seg_row = model.new_tokens.lookup[model.seg_token_id]
    assert model.new_tokens.embed.grad[seg_row].abs().sum() > 0  # [SEG] is in the input: its row learns

    keys = set(model.state_dict())
    assert keys == model.trainable_keys()
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert {"new_tokens.embed", "new_tokens.head"} <= keys
    assert any(k.startswith("model.mlp1.") for k in keys)
    assert any(k.startswith("model.text_hidden_fcs.") for k in keys)
    assert any(k.startswith("model.grounding_encoder.sam2_model.sam_mask_decoder.") for k in keys)
    assert not any(k.startswith(("model.vision_model.", "model.grounding_encoder.sam2_model.image_encoder."))
                   for k in keys)
    assert not any(k.startswith("model.language_model.") and "lora_" not in k for k in keys)


def test_state_dict_roundtrip_and_reference_key_layout(in_root):
    cfg = tiny_cfg(lora=dict(r=4, lora_alpha=8, lora_dropout=0.0), freeze_vision=True, freeze_llm=True,
                   train_sam2_encoder=False, train_embeddings="new", train_mlp1=True)
    model = build_model(cfg)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    model.load_state_dict({"state_dict": saved})
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in saved.items())
    report = model.last_load_report
    assert not report["missing"] and not report["unexpected"] and len(report["loaded"]) == len(saved)
    # reference layout: mllm.model.* / grounding_encoder.* / text_hidden_fcs.* at top level
    ref = {}
    for k, v in saved.items():
        if k.startswith("model.grounding_encoder.") or k.startswith("model.text_hidden_fcs."):
            ref[k[len("model."):]] = v + 2
        elif k.startswith("model."):
            ref["mllm." + k] = v + 2
    model.load_state_dict(ref)
    assert torch.equal(model.state_dict()["model.mlp1.0.weight"], saved["model.mlp1.0.weight"] + 2)
    # missing trainable tensors are reported (strict raises), unknown keys too
    partial = {k: v for k, v in saved.items() if "mlp1" not in k}
    model.load_state_dict(partial)
    assert model.last_load_report["missing"] and all("mlp1" in k for k in model.last_load_report["missing"])
    with pytest.raises(ValueError, match="missing"):
        model.load_state_dict(partial, strict=True)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_state_dict(dict(saved, **{"model.bogus.weight": torch.zeros(1)}), strict=True)


def test_few_optimizer_steps_decrease_the_loss(in_root):
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg, indices=(4,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    values = []
    for step in range(6):
        torch.manual_seed(step)  # same point-sampling randomness pattern as a real run
        loss = total(forward(model, batch))
        values.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    assert values[-1] < values[0] * 0.9, values


def test_no_mask_batch_has_zero_mask_losses_and_the_same_trainable_graph(in_root):
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg, indices=(4,))
    for key in ("masks", "g_pixel_values", "frames_per_batch"):
        batch["data"].pop(key)
    losses = forward(model, batch)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    assert losses["llm_loss"].item() > 0
    total(losses).backward()
    decoder = model.model.grounding_encoder.sam2_model.sam_mask_decoder
    assert decoder.output_upscaling[0].weight.grad is not None
    assert model.model.text_hidden_fcs[0].weight.grad is not None
    # a text-only batch (no images at all) also runs
    ids = torch.tensor([model.tokenizer("Please segment the red circle.").input_ids])
    text_only = {"data": {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                          "position_ids": torch.arange(ids.shape[1])[None]}, "data_samples": None}
    losses = forward(model, text_only)
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(losses["llm_loss"])


def test_count_mismatches_raise_clear_errors(in_root):
    cfg = tiny_cfg()
    model = build_model(cfg)
    batch = make_batch(cfg, indices=(4,))
    bad = {"data": dict(batch["data"], masks=[batch["data"]["masks"][0][:-1]]), "data_samples": None}
    with pytest.raises(ValueError, match="masks of shape"):
        forward(model, bad)
    bad = {"data": dict(batch["data"], frames_per_batch=[7], g_pixel_values=batch["data"]["g_pixel_values"][:7]),
           "data_samples": None}
    with pytest.raises(ValueError, match="not a multiple"):
        forward(model, bad)
    bad = {"data": dict(batch["data"], frames_per_batch=[10, 1]), "data_samples": None}
    with pytest.raises(ValueError, match="contain \\[SEG\\]"):
        forward(model, bad)


def test_export_chat_model_matches_the_training_model(in_root):
    from peft import PeftModel

    cfg = tiny_cfg(lora=dict(r=4, lora_alpha=8, lora_dropout=0.0), freeze_vision=True, freeze_llm=True,
                   train_sam2_encoder=False, train_embeddings="new", train_mlp1=True)
    model = build_model(cfg)
    with torch.no_grad():  # make LoRA and the new rows non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.startswith("new_tokens.")):
                p.add_(0.05 * torch.randn_like(p))
    data = model.data_preprocessor(make_batch(cfg, indices=(4,)), True)["data"]
    model.eval()
    pixel = torch.cat(data["pixel_values"])
    with torch.no_grad():
        before = model.model(input_ids=data["input_ids"], pixel_values=pixel).logits
    chat, tokenizer = model.export_chat_model()
    assert not isinstance(chat.language_model, PeftModel)
    assert not any("lora_" in k for k in chat.state_dict())
    with torch.no_grad():
        after = chat(input_ids=data["input_ids"], pixel_values=pixel).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert chat.config.llm_config.vocab_size == len(tokenizer)
    assert chat.config.sam2_image_size == chat.grounding_encoder.image_size == 256
    assert chat.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]")


# ----------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,path,template,bs,acc,repeats", [
    ("sasasa2va_in25_4b", "./pretrained/internvl2_5/InternVL2_5-4B", "phi3_chat", 2, 4, [4, 4, 4, 2, 5, 2, 3]),
    ("sasasa2va_in35_14b", "./pretrained/internvl3_5/InternVL3_5-14B", "qwen_chat", 2, 4, [4, 4, 4, 3, 6, 3, 3]),
    ("sasasa2va_in25_26b", "./pretrained/internvl2_5/InternVL2_5-26B", "internlm2_chat", 1, 8, [4, 4, 4, 2, 5, 2, 3]),
])
def test_real_configs(name, path, template, bs, acc, repeats):
    cfg = Config.fromfile(os.path.join(CONFIG_DIR, name + ".py"))
    stem = name.replace("sasasa2va_", "model_")
    assert cfg.model.mllm_path == path and cfg.model.template == template
    assert cfg.model.pretrained_pth == f"./pretrained/Sa2VA_pth/{stem}.pth"
    assert cfg.model.sam2_ckpt == "./pretrained/sam2/sam2_hiera_large.pt" and cfg.model.sam2_config == "sam2_hiera_l"
    assert cfg.model.lora["r"] == 128 and cfg.model.lora["lora_alpha"] == 256
    assert cfg.model.lora["lora_dropout"] == 0.05 and cfg.model.num_points == 12544
    assert (cfg.model.loss_mask_weight, cfg.model.loss_dice_weight, cfg.model.llm_loss_weight) == (2.0, 0.5, 1.0)
    dl = cfg.train_dataloader
    assert dl.batch_size == bs and dl.num_workers == 8
    assert dl.sampler.per_device_batch_size == bs * acc and dl.sampler.length_property == "modality_length"
    datasets = dl.dataset.datasets
    assert [d["repeats"] for d in datasets] == repeats
    assert all(d["template_name"] == template and d["max_length"] == 12288 for d in datasets)
    assert all(d["tokenizer"]["pretrained_model_name_or_path"] == path for d in datasets)
    assert [d.get("dataset_type") for d in datasets[3:]] == ["default", "default", "refytvos", "refsav"]
    ow = cfg.optim_wrapper
    assert ow.accumulative_counts == acc and ow.dtype == "bfloat16" and ow.clip_grad.max_norm == 1
    assert ow.optimizer.lr == 4e-5 and ow.optimizer.weight_decay == 0.05 and tuple(ow.optimizer.betas) == (0.9, 0.999)
    warm, cos = cfg.param_scheduler
    assert warm.start_factor == 1e-5 and warm.end == pytest.approx(0.05) and cos.begin == pytest.approx(0.05)
    assert warm.convert_to_iter_based and cos.convert_to_iter_based and cos.eta_min == 0.0
    assert cfg.train_cfg.max_epochs == 1
    assert cfg.default_hooks.checkpoint.interval == 1000 and cfg.default_hooks.checkpoint.max_keep_ckpts == 2
    assert cfg.default_hooks.logger.interval == 10 and cfg.env_cfg.dist_cfg.backend == "nccl"
    assert (cfg.model.get("trust_remote_code") is True) == (template == "internlm2_chat")
    assert (cfg.model.lora.get("include_internlm2_output") is True) == (template == "internlm2_chat")


def test_tiny_config_settings():
    cfg = Config.fromfile(TINY_CONFIG)
    assert cfg.train_dataloader.batch_size == 1 and cfg.optim_wrapper.accumulative_counts == 1
    # 1e-3 left the SAM2 decoder matching colours only halfway (README "Seed spread"); 3e-4 is the measured one
    assert cfg.train_dataloader.num_workers <= 1 and 2e-4 <= cfg.optim_wrapper.optimizer.lr <= 5e-4
    # the quickstart is reproducible (same data order); the real configs leave the seed unset
    real = Config.fromfile(os.path.join(CONFIG_DIR, "sasasa2va_in25_4b.py"))
    assert cfg.randomness.seed == 0 and real.randomness.seed is None
    assert cfg.default_hooks.logger.interval == 10 and cfg.default_hooks.checkpoint.interval == 100
    assert cfg.model.lora is None and cfg.model.sam2_config == {"name": "tiny", "hidden_dim": 128}
    assert cfg.auto_prepare.tiny_pretrained.sam2_hidden_dim == 128 and cfg.auto_prepare.tiny_pretrained.image_size == 56
    assert cfg.image_size == 56 and cfg.tokens_per_image == 4  # 56 px ViT, pixel shuffle: (56 / 14 / 2) ** 2
    # the stand-in-pretrained MLLM is frozen; the LM head, prompt head and SAM2 train
    assert cfg.model.freeze_llm and cfg.model.freeze_vision and not cfg.model.train_mlp1
    assert cfg.model.train_embeddings == "lm_head" and cfg.model.pretrained_pth == "pretrained/tiny/sa2va_tiny.pth"
    assert cfg.auto_prepare.stand_in_pretraining.steps >= 1
    assert cfg.auto_prepare.synthetic_data.root == "data/synthetic/"
    assert cfg.auto_prepare.tiny_pretrained.out_dir == "pretrained/tiny/"
    assert cfg.model.mllm_path.startswith("pretrained/tiny/")


# ----------------------------------------------------------------------------------------- tools/train.py
def test_train_py_helpers(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import train as train_tool
    finally:
        sys.path.pop(0)
    argv = ["cfg.py", "--deepspeed", "x", "--resume=auto", "--cfg-options", "a=1", "b=[1,2]", "--work-dir", "w"]
    assert train_tool.strip_options(argv, ("--work-dir", "--deepspeed", "--resume")) == [
        "cfg.py", "--cfg-options", "a=1", "b=[1,2]"]
    assert train_tool.resolve_deepspeed("deepspeed_zero2", has_cuda=False) is None
    assert train_tool.resolve_deepspeed("none", has_cuda=True) is None
    assert train_tool.resolve_deepspeed("deepspeed_zero2", has_cuda=True) == os.path.join(
        ROOT, "configs", "deepspeed", "deepspeed_zero2.json")
    assert train_tool.resolve_deepspeed("deepspeed_zero3", has_cuda=True) == "deepspeed_zero3"  # xtuner's file
    cfg = Config.fromfile(TINY_CONFIG)
    train_tool.patch_for_cpu(cfg, "pytorch")
    assert cfg.optim_wrapper.type == "OptimWrapper" and "dtype" not in cfg.optim_wrapper
    assert cfg.env_cfg.dist_cfg.backend == "gloo" and cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is True
    dist = os.path.join(ROOT, "tools", "dist.sh")
    ok = subprocess.run(["bash", dist, "--help"], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "usage: bash tools/dist.sh TOOL CONFIG NUM_GPUS" in ok.stdout
    missing = subprocess.run(["bash", dist, "train", "nope.py", "1"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "config not found: nope.py" in missing.stderr
    assert train_tool.complete_checkpoints("/nonexistent") == []
    work = tmp_path / "work"
    work.mkdir()
    (work / "iter_3.pth").write_bytes(b"PK cut short")  # nothing to keep: a new run may start here
    (work / ".tmp_77_iter_4.pth").write_bytes(b"half")
    (work / "notes.txt").write_text("mine")
    assert train_tool.complete_checkpoints(str(work)) == []
    torch.save({"a": torch.ones(1)}, work / "iter_0.pth")
    assert train_tool.complete_checkpoints(str(work)) == ["iter_0.pth"]
    assert train_tool.remove_stale_temp_checkpoints(str(work)) == [".tmp_77_iter_4.pth"]
    assert sorted(os.listdir(work)) == ["iter_0.pth", "iter_3.pth", "notes.txt"]
    # DeepSpeed folders (written in place): complete only with model states and every .pt intact
    for n, files in ((5, {}), (6, {"mp_rank_00_model_states.pt": True, "bf16_zero_pp_rank_0_optim_states.pt": False}),
                     (7, {"mp_rank_00_model_states.pt": True, "bf16_zero_pp_rank_0_optim_states.pt": True})):
        folder = work / f"iter_{n}.pth"
        folder.mkdir()
        for name, whole in files.items():
            torch.save({"a": torch.ones(1)}, folder / name)
            if not whole:
                (folder / name).write_bytes((folder / name).read_bytes()[:40])
    assert train_tool.complete_checkpoints(str(work)) == ["iter_0.pth", "iter_7.pth"]
    with pytest.raises(SystemExit) as exc:  # an item without '=': a usage error, not a traceback
        train_tool.build_parser().parse_args(["cfg.py", "--cfg-options", "lr"])
    assert exc.value.code == 2
    assert train_tool.build_parser().parse_args(["cfg.py", "--cfg-options", "a.b=[1,2]"]).cfg_options == {"a.b": [1, 2]}


def test_base_weights_record_and_mismatch(tmp_path):
    from projects.sasasa2va.utils.base_weights import base_weights_mismatch, file_fingerprint, record_base_weights

    pth = tmp_path / "base.pth"
    pth.write_bytes(b"a" * 1000)
    cfg = Config({"model": {"pretrained_pth": str(pth)}})
    work = tmp_path / "work"
    work.mkdir()
    assert base_weights_mismatch(str(work), cfg) is None  # no record: nothing to compare
    record_base_weights(str(work), cfg)
    assert base_weights_mismatch(str(work), cfg) is None
    pth.write_bytes(b"b" + b"a" * 999)  # regenerated: same size, other bytes
    assert "changed since the run started" in base_weights_mismatch(str(work), cfg)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(20 << 20))
    first = file_fingerprint(str(big))
    with open(big, "r+b") as f:
        f.seek((20 << 20) - 1)
        f.write(b"x")  # the tail is read too
    assert file_fingerprint(str(big)) != first
    pth.unlink()
    assert "missing now" in base_weights_mismatch(str(work), cfg)


def test_checkpoint_saves_are_atomic(tmp_path):
    import mmengine.runner.runner as runner_module

    from projects.sasasa2va.utils.checkpoint import install_atomic_checkpoint_saves

    saved = runner_module.save_checkpoint
    try:
        install_atomic_checkpoint_saves()
        wrapped = runner_module.save_checkpoint
        install_atomic_checkpoint_saves()
        assert runner_module.save_checkpoint is wrapped and wrapped is not saved  # wrapped once, not twice
        path = str(tmp_path / "iter_1.pth")
        runner_module.save_checkpoint({"a": torch.ones(2)}, path)
        assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))

        def half_written(checkpoint, filename, *a, **k):
            with open(filename, "wb") as f:
                f.write(b"PK\x03\x04 cut")
            raise KeyboardInterrupt

        runner_module.save_checkpoint = half_written  # mmengine's save, killed mid-write
        install_atomic_checkpoint_saves()
        with pytest.raises(KeyboardInterrupt):
            runner_module.save_checkpoint({"a": 1}, str(tmp_path / "iter_2.pth"))
        assert sorted(os.listdir(tmp_path)) == ["iter_1.pth"]  # no truncated iter_2.pth, no temp file
    finally:
        runner_module.save_checkpoint = saved


def test_tiny_checkpoints_are_checked_against_the_config(tmp_path):
    from projects.sasasa2va.models.tiny import check_tiny_manifest, tiny_cli_args

    spec = dict(Config.fromfile(TINY_CONFIG).auto_prepare.tiny_pretrained)
    spec.pop("out_dir")
    cmd = "python tools/make_tiny_pretrained.py --out X " + " ".join(tiny_cli_args(spec))
    manifest = {"arch": "qwen2", "image_size": 56, "seed": 3, "sam2_config": {"name": "tiny", "hidden_dim": 128}}
    (tmp_path / "tiny_manifest.json").write_text(json.dumps(manifest))
    check_tiny_manifest(str(tmp_path), spec, cmd)  # another seed: same shapes, accepted
    manifest.update(image_size=112, sam2_config={"name": "tiny"})  # the generator's plain defaults
    (tmp_path / "tiny_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"image_size 112 \(config: 56\), sam2_hidden_dim None \(config: 128\)"
                       r".*--image-size 56 --seed 0 --sam2-hidden-dim 128"):
        check_tiny_manifest(str(tmp_path), spec, cmd)


def test_a_cut_short_tiny_rebuild_leaves_no_manifest(tmp_path, monkeypatch):
    """The manifest and the stand-in marker go before any file is rewritten: a rebuild that dies midway (here
    while writing the SAM2 checkpoint) leaves a folder auto_prepare rebuilds, never one that looks complete."""
    from projects.sasasa2va.models import tiny
    from projects.sasasa2va.models.stand_in_pretraining import MARKER

    out = tmp_path / "t"
    tiny.make_tiny_pretrained(str(out), image_size=56, with_sa2va_pth=False)
    assert (out / "tiny_manifest.json").is_file()
    (out / MARKER).write_text("{}")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "write_tiny_sam2", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny.make_tiny_pretrained(str(out), image_size=56)
    assert not (out / "tiny_manifest.json").exists() and not (out / MARKER).exists()


def test_make_tiny_pretrained_cli_defaults_follow_the_tiny_config(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_pretrained.py"), "--out",
                          str(tmp_path / "t"), "--no-sa2va-pth"], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    made = json.loads((tmp_path / "t" / "tiny_manifest.json").read_text())
    assert made["image_size"] == 56 and made["sam2_config"] == {"name": "tiny", "hidden_dim": 128}
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_pretrained.py"), "--out",
                            str(tmp_path / "t"), "--no-sa2va-pth"], cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "already holds tiny checkpoints" in again.stderr and "--force" in again.stderr


# ----------------------------------------------------------------------------------------- launcher
def run_dist(cwd, nproc, *args, timeout=600):
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    cmd = ["bash", os.path.join(ROOT, "tools", "dist.sh"), "train", TINY_CONFIG, str(nproc), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def iter_lines(out):
    return re.findall(r"Iter\(train\) \[\s*(\d+)/(\d+)\]\s+lr: ([0-9.e+-]+)\s+eta: (\S+).*?loss: ([0-9.]+)", out)


def test_dist_sh_trains_and_writes_checkpoints(workroot):
    out = run_dist(workroot, 1, "--work-dir", "wd_run", "--cfg-options", *RUN_OPTIONS, "train_cfg.max_iters=3",
                   "default_hooks.checkpoint.interval=2")
    lines = iter_lines(out)
    assert [int(i) for i, *_ in lines] == [1, 2, 3] and all(n == "3" for _, n, *_ in lines)
    assert "Distributed training: True" in out and "OptimWrapper" in out
    wd = workroot / "wd_run"
    assert (wd / "iter_2.pth").is_file() and (wd / "iter_3.pth").is_file()
    assert (wd / "last_checkpoint").read_text().strip().endswith("iter_3.pth")
    assert glob.glob(str(wd / "*" / "*.log"))
    ckpt = torch.load(wd / "iter_3.pth", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert any(k.startswith("model.text_hidden_fcs.") for k in keys)
    assert not any(k.startswith("model.grounding_encoder.sam2_model.sam_prompt_encoder.") for k in keys)  # frozen
    assert ckpt["meta"]["iter"] == 3 and "optimizer" in ckpt
    assert not [n for n in os.listdir(wd) if n.startswith(".tmp")]  # checkpoints written under a temp name first
    record = json.loads((wd / "base_weights.json").read_text())
    assert record["pretrained_pth"]["path"].endswith("sa2va_tiny.pth") and len(record["pretrained_pth"]["fingerprint"]) == 32
    # a new run in the same work dir would write over these checkpoints: refused, before any training
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    again = subprocess.run(["bash", os.path.join(ROOT, "tools", "dist.sh"), "train", TINY_CONFIG, "1", "--work-dir",
                            "wd_run", "--cfg-options", *RUN_OPTIONS, "train_cfg.max_iters=3"], cwd=workroot, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "holds checkpoints of an earlier run" in again.stderr + again.stdout
    assert "--resume auto" in again.stderr + again.stdout


@pytest.mark.slow
def test_resume_continues_iterations_and_lr_schedule(workroot):
    common = ["--work-dir", "wd_resume", "--cfg-options", *RUN_OPTIONS]
    first = iter_lines(run_dist(workroot, 1, *common, "train_cfg.max_iters=4"))
    out = run_dist(workroot, 1, "--resume", "auto", *common, "train_cfg.max_iters=8")
    second = iter_lines(out)
    assert [int(i) for i, *_ in first] == [1, 2, 3, 4]
    assert [int(i) for i, *_ in second] == [5, 6, 7, 8]
    assert "resumed epoch: 0, iter: 4" in out
    # 11 iterations per epoch: warmup over 2 (0.2 epochs), cosine from iteration 2 to the config's last
    # epoch (param_scheduler[1].end, 3 epochs: T = 33 - 2 = 31); the config's base lr
    cfg = Config.fromfile(TINY_CONFIG)
    base, period = cfg.optim_wrapper.optimizer.lr, round(cfg.param_scheduler[1].end * 11) - 2
    for i, _, lr, *_ in first[2:] + second:
        expected = base * (1 + math.cos(math.pi * (int(i) - 3) / period)) / 2
        assert float(lr) == pytest.approx(expected, rel=2e-3), (i, lr, expected)
    ckpt = torch.load(workroot / "wd_resume" / "iter_8.pth", map_location="cpu", weights_only=False)
    assert ckpt["meta"]["iter"] == 8


@pytest.mark.slow
def test_two_cpu_processes_with_gloo(workroot):
    out = run_dist(workroot, 2, "--work-dir", "wd_two", "--cfg-options", *RUN_OPTIONS, "train_cfg.max_iters=2")
    assert "GPU number: 2" in out and "gloo" in out
    assert [int(i) for i, *_ in iter_lines(out)] == [1, 2]
    assert (workroot / "wd_two" / "iter_2.pth").is_file()
