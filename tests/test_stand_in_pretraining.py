"""Stand-in pretraining of the tiny MLLM (projects/sasasa2va/models/stand_in_pretraining.py) and the
frozen-LLM-body training mode (train_embeddings='lm_head')."""
import json
import os

import pytest
import torch
from mmengine.config import Config

from projects.sasasa2va.datasets.refvos import build_object
from projects.sasasa2va.datasets.synthetic import COLORS, SHAPES
from projects.sasasa2va.models import stand_in_pretraining as sip
from projects.sasasa2va.models.tiny import make_tiny_for_config

# the same module-scoped tiny root (small synthetic data + tiny checkpoints of the config) and cwd fixture
from test_training import TINY_CONFIG, in_root, workroot  # noqa: E402,F401


def test_colour_word_in_needs_exactly_one_palette_colour():
    assert sip.colour_word_in("the red circle") == "red"
    assert sip.colour_word_in("Can you segment the circle that is blue?") == "blue"
    assert sip.colour_word_in("the star") is None
    assert sip.colour_word_in("the red and the blue square") is None


def test_shape_word_in_needs_exactly_one_singular_shape():
    assert sip.shape_word_in("Please segment the star that is yellow.") == "star"
    assert sip.shape_word_in("the object moving up") is None
    assert sip.shape_word_in("the two triangles") is None
    assert sip.shape_word_in("the circle left of the square") is None


def test_target_colours_reads_the_masked_pixels():
    frame = torch.zeros(3, 32, 32, dtype=torch.uint8)
    frame[:, :, :16] = torch.tensor(COLORS["red"], dtype=torch.uint8).view(3, 1, 1)
    frame[:, :, 16:] = torch.tensor(COLORS["blue"], dtype=torch.uint8).view(3, 1, 1)
    left = torch.zeros(16, 16, dtype=torch.uint8)
    left[:, :8] = 1
    right = torch.flip(left, dims=[1])
    both = torch.ones(16, 16, dtype=torch.uint8)
    empty = torch.zeros(16, 16, dtype=torch.uint8)
    masks = torch.stack([left, left, right, empty, both, both, empty, empty])  # 4 objects x 2 frames
    assert sip.target_colours(masks, [frame, frame], 2) == ["red", "blue", None, None]
    with pytest.raises(ValueError, match="multiple"):
        sip.target_colours(masks[:3], [frame, frame], 2)
    with pytest.raises(ValueError, match="prompt_scale"):
        sip.run_stand_in_pretraining(None, prompt_scale=0.0)


def test_insert_after_seg_supervises_the_inserted_words():
    seg = 7
    ids = [1, 2, seg, 3, seg, 4]
    labels = [-100, -100, seg, 3, seg, 4]
    out_ids, out_labels = sip.insert_after_seg(ids, labels, seg, [[50, 51], None])
    assert out_ids == [1, 2, seg, 50, 51, 3, seg, 4]
    assert out_labels == [-100, -100, seg, 50, 51, 3, seg, 4]
    with pytest.raises(ValueError, match="2 \\[SEG\\] tokens but 1"):
        sip.insert_after_seg(ids, labels, seg, [[50]])
    with pytest.raises(ValueError, match="labels"):
        sip.insert_after_seg(ids, labels[:-1], seg, [None, None])


def test_relabel_after_seg_changes_only_the_label_after_each_seg():
    seg = 7
    ids = [1, 2, seg, 3, seg, 4]
    labels = [-100, -100, seg, 3, seg, 4]
    assert sip.relabel_after_seg(ids, labels, seg, [50, None]) == [-100, -100, seg, 50, seg, 4]
    assert sip.relabel_after_seg(ids, labels, seg, [50, 51]) == [-100, -100, seg, 50, seg, 51]
    with pytest.raises(ValueError, match="2 \\[SEG\\] tokens but 1"):
        sip.relabel_after_seg(ids, labels, seg, [50])
    with pytest.raises(ValueError, match="last token"):
        sip.relabel_after_seg(ids[:5], labels[:5], seg, [None, 50])


def test_seg_words_name_each_target_for_every_seg_token(in_root):
    cfg = Config.fromfile(TINY_CONFIG)
    ds = build_object(dict(cfg.train_dataloader.dataset.datasets[4], num_objects=2))  # MeViS videos
    tokenizer = ds.tokenizer
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    sample = ds[0]
    questions = sip.seg_questions(sample["input_ids"], tokenizer, seg_id)
    assert len(questions) == 20 and len(set(questions[:10])) == 1  # 2 expressions x 10 clips
    words = sip.seg_words(sample, tokenizer, seg_id)
    pixel = sip.target_colours(sample["masks"], sample["g_pixel_values"], 10)
    assert len(words) == 20 and all(w in COLORS or w in SHAPES for w in words)
    for k in range(2):
        q = questions[10 * k]
        expected = sip.colour_word_in(q) or sip.shape_word_in(q) or pixel[k]
        assert words[10 * k:10 * k + 10] == [expected] * 10
        if sip.colour_word_in(q):
            assert pixel[k] == expected  # the text and the pixels agree on the synthetic data
    image = build_object(dict(cfg.train_dataloader.dataset.datasets[0], num_objects=2))[0]  # RefCOCO: one tensor
    assert len(sip.seg_words(image, tokenizer, seg_id)) == 2

    # relabel: same input, the token after each [SEG] is labelled with its word
    out, named, total = sip.echo_sample(sample, tokenizer, seg_id, word_target="relabel")
    assert (named, total) == (20, 20)
    assert list(out["input_ids"]) == list(sample["input_ids"])
    seg_pos = [j for j, t in enumerate(sample["input_ids"]) if t == seg_id]
    assert [out["labels"][j + 1] for j in seg_pos] == [tokenizer.encode(" " + w, add_special_tokens=False)[0]
                                                       for w in words]
    others = [j for j in range(len(out["labels"])) if j - 1 not in seg_pos]
    assert [out["labels"][j] for j in others] == [sample["labels"][j] for j in others]
    with pytest.raises(ValueError, match="word_target"):
        sip.echo_sample(sample, tokenizer, seg_id, word_target="append")

    out, named, total = sip.echo_sample(sample, tokenizer, seg_id, word_target="insert")
    assert (named, total) == (20, 20)
    ids = list(out["input_ids"])
    encoded = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    seg_pos = [j for j, t in enumerate(ids) if t == seg_id]
    assert [ids[j + 1:j + 1 + len(e)] for j, e in zip(seg_pos, encoded)] == encoded  # each [SEG]: its word ...
    assert all(out["labels"][j + 1:j + 1 + len(e)] == ids[j + 1:j + 1 + len(e)]  # ... which is supervised
               for j, e in zip(seg_pos, encoded))
    assert len(ids) == len(sample["input_ids"]) + sum(len(e) for e in encoded)


def test_run_stand_in_pretraining_changes_only_the_mllm_and_writes_a_marker(in_root):
    cfg = Config.fromfile(TINY_CONFIG)
    pth = cfg.model.pretrained_pth
    before = torch.load(pth, map_location="cpu")
    record = sip.run_stand_in_pretraining(cfg, steps=2, accumulate=1, prompt_scale=3.0, progress=False)
    assert record["word_target"] == "insert"
    after = torch.load(pth, map_location="cpu")
    assert set(after) == set(before)
    marker = json.loads((in_root / "pretrained" / "tiny" / sip.MARKER).read_text())
    assert marker == record and record["steps"] == 2 and record["seg_tokens"] > 0
    assert record["loss_first"] > 0 and record["seg_tokens_named"] > 0

    def changed(prefix):
        keys = [k for k in before if k.startswith(prefix)]
        assert keys, prefix
        return any(not torch.equal(before[k], after[k]) for k in keys)

    assert changed("mllm.model.language_model.model.layers.")
    assert changed("mllm.model.vision_model.") and changed("mllm.model.mlp1.")
    head = [k for k in before if k.endswith("lm_head.weight")]
    assert head and all(torch.equal(before[k], after[k]) for k in head)
    assert not changed("grounding_encoder.")
    fcs = sorted(k for k in before if k.startswith("text_hidden_fcs."))
    last_w = [k for k in fcs if k.endswith(".weight")][-1]
    assert torch.allclose(after[last_w], 3.0 * before[last_w])
    # rerunning tools/train.py's auto_prepare sees the marker and does not train again
    from tools.train import auto_prepare

    cfg.auto_prepare.stand_in_pretraining.steps = 1
    stamp = os.path.getmtime(pth)
    auto_prepare(cfg)
    assert os.path.getmtime(pth) == stamp
    with pytest.raises(ValueError, match="already stand-in-pretrained"):  # would scale the prompt head twice
        sip.run_stand_in_pretraining(cfg, steps=1, accumulate=1, progress=False)


def test_lm_head_mode_freezes_everything_in_the_llm_but_the_head(in_root, monkeypatch):
    from mmengine.registry import MODELS

    from projects.sasasa2va.models import sasasa2va

    cfg = Config.fromfile(TINY_CONFIG)
    assert cfg.model.train_embeddings == "lm_head" and cfg.model.freeze_vision
    model = MODELS.build(dict(cfg.model, freeze_llm=True))
    lm = model.model.language_model
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lm.named_parameters() if "lm_head" in n}
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())
    assert not any(p.requires_grad for p in model.model.mlp1.parameters())
    assert all(p.requires_grad for p in model.model.text_hidden_fcs.parameters())

    original = sasasa2va.load_internvl_folder

    def tied(*args, **kwargs):
        chat, tok = original(*args, **kwargs)
        chat.language_model.config.tie_word_embeddings = True
        return chat, tok

    monkeypatch.setattr(sasasa2va, "load_internvl_folder", tied)
    with pytest.raises(ValueError, match="untied"):
        MODELS.build(dict(cfg.model, pretrained_pth=None))


def test_pretrain_tiny_cli_runs_once_and_validates_its_arguments(in_root, capsys):
    from tools.pretrain_tiny import main

    with pytest.raises(SystemExit):
        main([TINY_CONFIG, "--steps", "0"])
    with pytest.raises(SystemExit):
        main([str(in_root / "missing.py")])
    fresh = make_tiny_for_config(str(in_root / "fresh_random"), TINY_CONFIG)["sa2va_pth"]
    fcs = sorted(k for k in torch.load(fresh) if k.startswith("text_hidden_fcs.") and k.endswith(".weight"))[-1]
    # --force on an already pretrained folder: starts again from random weights (prompt head x6 once, not x36)
    assert main([TINY_CONFIG, "--steps", "1", "--accumulate", "1", "--force", "--no-progress", "--threads", "1",
                 "--word-target", "relabel"]) == 0
    assert torch.allclose(torch.load("pretrained/tiny/sa2va_tiny.pth")[fcs], 6.0 * torch.load(fresh)[fcs])
    out = capsys.readouterr().out
    assert "[SEG] tokens named; wrote pretrained/tiny/sa2va_tiny.pth" in out
    record = json.loads((in_root / "pretrained" / "tiny" / sip.MARKER).read_text())
    assert record["steps"] == 1 and record["accumulate"] == 1 and record["word_target"] == "relabel"
    assert main([TINY_CONFIG]) == 0
    assert "already done" in capsys.readouterr().out
    before = (in_root / "pretrained" / "tiny" / "sa2va_tiny.pth").read_bytes()
    marker = (in_root / "pretrained" / "tiny" / sip.MARKER).read_bytes()
    # a typo in a model key is refused with the config's name before anything runs ...
    assert main([TINY_CONFIG, "--force", "--cfg-options", "model.freeze_vison=True"]) == 2
    assert "does not take 'freeze_vison'" in capsys.readouterr().err
    # ... and a --force run failing once started (here: an unknown stand-in pretraining option) leaves the
    # pretrained checkpoint as it was
    with pytest.raises(TypeError, match="bogus_option"):
        main([TINY_CONFIG, "--steps", "1", "--accumulate", "1", "--force", "--no-progress", "--threads", "1",
              "--cfg-options", "auto_prepare.stand_in_pretraining.bogus_option=1"])
    assert (in_root / "pretrained" / "tiny" / "sa2va_tiny.pth").read_bytes() == before
    assert (in_root / "pretrained" / "tiny" / sip.MARKER).read_bytes() == marker
    assert not (in_root / "pretrained" / "tiny" / "sa2va_tiny.pth.before_force").exists()
    assert "restored as they were" in capsys.readouterr().err
    # a --force run KILLED while it rewrote the random checkpoints (no except clause ran): the backups, no
    # manifest, no marker, a cut-short .pth. The next run rebuilds the random files and puts the earlier
    # pretraining back instead of pretraining from scratch
    folder = in_root / "pretrained" / "tiny"
    (folder / "sa2va_tiny.pth.before_force").write_bytes(before)
    (folder / (sip.MARKER + ".before_force")).write_bytes(marker)
    (folder / sip.MARKER).unlink()
    (folder / "tiny_manifest.json").unlink()
    (folder / "sa2va_tiny.pth").write_bytes(before[:100])
    assert main([TINY_CONFIG]) == 0
    captured = capsys.readouterr()
    assert "before a --force run that was cut short" in captured.err and "already done" in captured.out
    assert (folder / "sa2va_tiny.pth").read_bytes() == before and (folder / sip.MARKER).read_bytes() == marker
    assert (folder / "tiny_manifest.json").is_file() and not list(folder.glob("*.before_force"))


@pytest.mark.parametrize("cut", ["before the weights' rename", "between the two renames"])
def test_pretraining_killed_during_its_last_renames_is_settled(in_root, monkeypatch, cut):
    """A kill while the pretrained weights and the marker are put in place: before the weights replaced
    the random .pth, the next run pretrains again (from the random weights); after, the marker is put in
    place and the weights are not pretrained twice."""
    cfg = Config.fromfile(TINY_CONFIG)
    pth = make_tiny_for_config(str(in_root / f"cut_{cut.split()[0]}"), TINY_CONFIG)["sa2va_pth"]
    random_bytes = open(pth, "rb").read()
    tmp, pending = sip.pending_paths(pth)
    victim = tmp if cut.startswith("before") else pending
    real_replace = os.replace

    def killed_at(src, dst):
        if os.path.abspath(src) == os.path.abspath(victim):
            raise KeyboardInterrupt  # stands for the kill
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at)
    with pytest.raises(KeyboardInterrupt):
        sip.run_stand_in_pretraining(cfg, out_pth=pth, steps=1, accumulate=1, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    marker = sip.marker_path(pth)
    assert not os.path.exists(marker) and os.path.isfile(pending)
    if cut.startswith("before"):
        assert open(pth, "rb").read() == random_bytes
        assert sip.finish_cut_short_save(pth) == "discarded"
        assert not os.path.exists(tmp) and not os.path.exists(pending) and not os.path.exists(marker)
        record = sip.run_stand_in_pretraining(cfg, out_pth=pth, steps=1, accumulate=1, progress=False)
        assert json.loads(open(marker).read()) == record
    else:
        assert open(pth, "rb").read() != random_bytes
        record = json.loads(open(pending).read())
        # the next run settles it first (run_stand_in_pretraining, tools/pretrain_tiny.py and train.py's
        # auto_prepare all do): the marker appears, and pretraining again is refused
        with pytest.raises(ValueError, match="already stand-in-pretrained"):
            sip.run_stand_in_pretraining(cfg, out_pth=pth, steps=1, accumulate=1, progress=False)
        assert json.loads(open(marker).read()) == record and not os.path.exists(pending)
    assert sip.finish_cut_short_save(pth) is None
