"""Training datasets (KFC video, RefCOCO image), concat with repeats, collate, DataLoader workers
(spec model_training §4-5, model_training_reference §4-6). Tiny synthetic data and image sizes."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from projects.sasasa2va.datasets.collate import sasasa2va_collate_fn
from projects.sasasa2va.datasets.concat import ConcatDatasetWithRepeats
from projects.sasasa2va.datasets.conversation import ANSWER_LIST, video_answers
from projects.sasasa2va.datasets.errors import DataError
from projects.sasasa2va.datasets.readers import (
    expression_masks, load_frame, load_refsav_sample, read_meta_expressions, read_refsav, read_refytvos,
    load_mask_dict)
from projects.sasasa2va.datasets.refseg import SaSaSa2VARefSeg
from projects.sasasa2va.datasets.refvos import SaSaSa2VARefVOS, repeat_index_map
from projects.sasasa2va.datasets.synthetic import generate_all
from projects.sasasa2va.hf.models.frame_sampling import split_clips, training_indices
from projects.sasasa2va.hf.models.preprocessing import kfc_mllm_images, sam2_resize
from projects.sasasa2va.hf.models.templates import IGNORE_INDEX, IMG_CONTEXT_TOKEN, PROMPT_TEMPLATES

from test_conversation import _train

SMALL = dict(image_size=28, tokens_per_image=4, sam2_image_size=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("synth"))
    generate_all(r, seed=0, num_train_videos=3, num_valid_u_videos=0, num_valid_videos=0, num_revos_videos=2,
                 num_rvos_videos=2, num_sav_videos=2, num_images=4, min_frames=5, max_frames=12, sizes="64x48",
                 min_objects=2, max_objects=3, formats="mevis,revos,rvos,refsav,refcoco")
    return r


@pytest.fixture(scope="module")
def tok():
    return _train()


def mevis(root, tok, **kw):
    base = os.path.join(root, "mevis", "train")
    args = dict(SMALL, tokenizer=tok)
    args.update(kw)
    return SaSaSa2VARefVOS(os.path.join(base, "JPEGImages"), os.path.join(base, "meta_expressions.json"),
                           os.path.join(base, "mask_dict.json"), "default", **args)


def refcoco(root, tok, **kw):
    args = dict(SMALL, tokenizer=tok)
    args.update(kw)
    return SaSaSa2VARefSeg(os.path.join(root, "ref_seg", "refcoco"), "refs(unc).p", **args)


def seg_id(tok):
    return tok.convert_tokens_to_ids("[SEG]")


def check_labels(tok, s, answers, template="phi3_chat"):
    """Only answers + suffix are supervised: the supervised text splits into valid answers."""
    suffix = PROMPT_TEMPLATES[template]["SUFFIX"]
    sup = [t for t, l in zip(s["input_ids"], s["labels"]) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(s["input_ids"], s["labels"]))
    text = tok.decode(sup)
    pieces = text.split(suffix)
    assert pieces[-1] == "" and all(p in answers for p in pieces[:-1])
    return len(pieces) - 1


def test_mevis_sample_layout(root, tok):
    ds = mevis(root, tok)
    assert ds.real_len() == 3 and len(ds) == 3
    s = ds[0]
    info = s["sample_info"]
    meta = os.path.join(root, "mevis", "train", "meta_expressions.json")
    rec = read_meta_expressions(meta, os.path.join(root, "mevis", "train", "JPEGImages"))[info["video_id"]]
    mask_dict = load_mask_dict(os.path.join(root, "mevis", "train", "mask_dict.json"))
    indices = training_indices(rec.num_frames, 100)
    keys = [c[0] for c in split_clips(indices, 10)]
    frames = [load_frame(rec, i) for i in range(rec.num_frames)]
    # images: 2*num_clips MLLM images (key_0, grid_0, ...), num_clips uint8 SAM2 key frames
    assert s["pixel_values"].shape == (20, 3, 28, 28) and s["pixel_values"].dtype == torch.float32
    assert torch.allclose(s["pixel_values"], kfc_mllm_images(frames, indices, 10, 3, 28))
    assert len(s["g_pixel_values"]) == 10
    for g, k in zip(s["g_pixel_values"], keys):
        assert g.dtype == torch.uint8 and torch.equal(g, sam2_resize(frames[k], 32))
    # masks: object-major [5*10, H, W], matching expression_masks on the key frames
    assert s["masks"].shape == (50, 48, 64) and s["masks"].dtype == torch.uint8
    assert len(info["exp_ids"]) == 5 and s["masks"].max() <= 1
    for k, e in enumerate(info["exp_ids"]):
        exp = expression_masks(rec, e, mask_dict, keys)
        assert np.array_equal(s["masks"][k * 10:(k + 1) * 10].numpy(), exp.astype(np.uint8))
    assert s["masks"].sum() > 0
    # conversation
    assert s["input_ids"].count(seg_id(tok)) == 50
    n_ctx = s["input_ids"].count(tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    assert n_ctx == s["num_image_tokens"] == 2 * 10 * 4
    assert check_labels(tok, s, video_answers(10)) == 5
    assert s["frames_per_batch"] == 10 and s["type"] == "video"
    # the first question carries the image tokens, the others do not
    text = tok.decode(s["input_ids"])
    assert text.count("<|user|>\n<img>") == 1 and text.count("<img>") == 20


def test_kfc_parameters_and_uniform(root, tok):
    ds = mevis(root, tok, num_clips=4, grid_size=2, frame_strategy="uniform", num_objects=3)
    s = ds[1]
    assert s["pixel_values"].shape[0] == 8 and len(s["g_pixel_values"]) == 4
    assert s["masks"].shape[0] == 12 and s["input_ids"].count(seg_id(tok)) == 12
    assert s["num_image_tokens"] == 8 * 4 and s["frames_per_batch"] == 4
    assert check_labels(tok, s, video_answers(4)) == 3


def test_refytvos_and_revos(root, tok):
    rv = os.path.join(root, "rvos")
    ds = SaSaSa2VARefVOS(os.path.join(rv, "train", "JPEGImages"),
                         os.path.join(rv, "meta_expressions", "train", "meta_expressions.json"),
                         os.path.join(rv, "mask_dict.pkl"), "refytvos", tokenizer=tok, **SMALL)
    records, mask_dict = read_refytvos(os.path.join(rv, "meta_expressions", "train", "meta_expressions.json"),
                                       os.path.join(rv, "train", "JPEGImages"), os.path.join(rv, "mask_dict.pkl"))
    for i in range(len(ds)):
        s = ds[i]
        rec = records[s["sample_info"]["video_id"]]
        keys = [c[0] for c in split_clips(training_indices(rec.num_frames, 100), 10)]
        for k, e in enumerate(s["sample_info"]["exp_ids"]):
            exp = expression_masks(rec, e, mask_dict, keys).astype(np.uint8)
            assert np.array_equal(s["masks"][k * 10:(k + 1) * 10].numpy(), exp)
        assert s["input_ids"].count(seg_id(tok)) == 50
    rb = os.path.join(root, "revos")
    ds = SaSaSa2VARefVOS(os.path.join(rb, "JPEGImages"), os.path.join(rb, "meta_expressions_train_.json"),
                         os.path.join(rb, "mask_dict.json"), tokenizer=tok, **SMALL)
    s = ds[0]
    assert "/" in s["sample_info"]["video_id"] and s["masks"].shape == (50, 48, 64)


def test_refsav(root, tok):
    ds = SaSaSa2VARefVOS(os.path.join(root, "sam_v_full"), os.path.join(root, "Ref-SAV.json"), None, "refsav",
                         tokenizer=tok, **SMALL)
    recs = {r.key: r for r in read_refsav(os.path.join(root, "Ref-SAV.json"), os.path.join(root, "sam_v_full"))}
    s = ds[0]
    rec = recs[s["sample_info"]["video_id"]]
    frames, masks = load_refsav_sample(rec)
    keys = [c[0] for c in split_clips(training_indices(len(frames), 100), 10)]
    for k, o in enumerate(s["sample_info"]["exp_ids"]):
        assert np.array_equal(s["masks"][k * 10:(k + 1) * 10].numpy(), masks[o][keys].astype(np.uint8))
        assert rec.objects[o] in tok.decode(s["input_ids"])  # 'formated' used verbatim
    assert s["pixel_values"].shape == (20, 3, 28, 28) and len(s["g_pixel_values"]) == 10
    assert s["input_ids"].count(seg_id(tok)) == 50


def test_refcoco(root, tok):
    ds = refcoco(root, tok, repeats=2)
    assert len(ds) == 2 * ds.real_len() and len(ds.modality_length) == len(ds)
    assert all(v > 0 for v in ds.modality_length)
    for i in range(len(ds)):
        s = ds[i]
        n = s["pixel_values"].shape[0]
        assert s["pixel_values"].shape[1:] == (3, 28, 28) and 1 <= n <= 13
        img = ds.items[s["sample_info"]["index"]]
        assert ds._num_tiles(img.width, img.height) == n
        assert s["num_image_tokens"] == 4 * n
        assert s["input_ids"].count(tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)) == 4 * n
        assert isinstance(s["g_pixel_values"], torch.Tensor) and s["g_pixel_values"].shape == (3, 32, 32)
        assert s["g_pixel_values"].dtype == torch.uint8
        assert s["masks"].shape == (5, img.height, img.width) and s["masks"].max() == 1
        assert s["input_ids"].count(seg_id(tok)) == 5 and s["frames_per_batch"] == 1
        assert check_labels(tok, s, ANSWER_LIST) == 5
    # phrases: lowercased, one trailing '.' removed, chosen once at load
    assert all(p == p.lower() and not p.endswith(".") for ps in ds.phrases for p in ps)
    assert refcoco(root, tok).phrases == ds.phrases


def test_repeats_mapping_and_determinism(root, tok):
    m = repeat_index_map(10, 2.5, seed=3)
    counts = np.bincount(m, minlength=10)
    assert len(m) == 25 and counts.min() == 2 and counts.max() == 3
    assert len(set(repeat_index_map(10, 0.5, 1).tolist())) == 5
    assert np.array_equal(m, repeat_index_map(10, 2.5, seed=3))
    a, b = mevis(root, tok, repeats=2, seed=5), mevis(root, tok, repeats=2, seed=5)
    assert len(a) == 6 and sorted(np.bincount(a._index_map).tolist()) == [2, 2, 2]
    sa, sb = a[3], b[3]
    assert sa["input_ids"] == sb["input_ids"] and torch.equal(sa["masks"], sb["masks"])
    c = mevis(root, tok, sample_without_replacement=True, num_objects=3)
    assert all(len(set(c[i]["sample_info"]["exp_ids"])) == 3 for i in range(len(c)))


def _corrupt_copy(root, tmp_path):
    base = os.path.join(root, "mevis", "train")
    dst = str(tmp_path / "mevis_train")
    shutil.copytree(base, dst)
    vid = sorted(os.listdir(os.path.join(dst, "JPEGImages")))[0]
    bad = os.path.join(dst, "JPEGImages", vid, "00000.jpg")
    with open(bad, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data[:40])
        f.truncate()
    return dst, bad


def test_corrupt_jpeg_skipped_then_abort(root, tok, tmp_path, caplog):
    dst, bad = _corrupt_copy(root, tmp_path)
    args = (os.path.join(dst, "JPEGImages"), os.path.join(dst, "meta_expressions.json"),
            os.path.join(dst, "mask_dict.json"))
    ds = SaSaSa2VARefVOS(*args, tokenizer=tok, max_bad_fraction=0.5, **SMALL)
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
    assert ds.num_bad >= 1 and ds.num_attempts == len(ds) + ds.num_bad
    assert any(bad in r.getMessage() and "skipping bad sample" in r.getMessage() for r in caplog.records)
    assert all(s["input_ids"].count(seg_id(tok)) == 50 for s in samples)
    ds = SaSaSa2VARefVOS(*args, tokenizer=tok, max_bad_fraction=0.05, bad_check_min_samples=2, **SMALL)
    with pytest.raises(DataError, match="max_bad_fraction"):
        for i in range(len(ds)):
            ds[i]


def test_truncated_seg_is_a_bad_sample(root, tok):
    ds = mevis(root, tok, max_length=120, bad_check_min_samples=3)
    with pytest.raises(DataError, match=r"\[SEG\] tokens after truncation"):
        ds[0]
    assert ds.num_bad == 3


def test_collate_padding(root, tok):
    v, im = mevis(root, tok)[0], refcoco(root, tok)[0]
    out = sasasa2va_collate_fn([v, im])
    assert out["data_samples"] is None
    d = out["data"]
    L = max(len(v["input_ids"]), len(im["input_ids"]))
    n = len(im["input_ids"])
    assert d["input_ids"].shape == d["labels"].shape == d["attention_mask"].shape == (2, L)
    assert d["input_ids"][1, n:].eq(0).all() and d["labels"][1, n:].eq(-100).all()
    assert d["input_ids"][1, :n].tolist() == im["input_ids"] and d["labels"][0].tolist() == v["labels"]
    assert d["attention_mask"].dtype == torch.bool and d["attention_mask"].sum(1).tolist() == [L, n]
    assert torch.equal(d["position_ids"], torch.arange(L).repeat(2, 1))
    assert [p.shape[0] for p in d["pixel_values"]] == [20, im["pixel_values"].shape[0]]
    assert d["frames_per_batch"] == [10, 1] and len(d["g_pixel_values"]) == 11
    assert [m.shape[0] for m in d["masks"]] == [50, 5]
    d = sasasa2va_collate_fn([{"input_ids": [5, 6], "labels": [-100, 6]}], pad_index=7)["data"]
    assert set(d) == {"input_ids", "labels", "attention_mask", "position_ids"}


def test_concat_sampler_dataloader(root, tok, tmp_path):
    from xtuner.dataset.samplers import LengthGroupedSampler

    tok.save_pretrained(str(tmp_path / "tok"))
    tok_cfg = dict(type=PreTrainedTokenizerFast.from_pretrained, pretrained_model_name_or_path=str(tmp_path / "tok"))
    base = os.path.join(root, "mevis", "train")
    concat = ConcatDatasetWithRepeats([
        dict(type=SaSaSa2VARefSeg, data_root=os.path.join(root, "ref_seg", "refcoco"), tokenizer=tok_cfg,
             repeats=2, **SMALL),
        dict(type=SaSaSa2VARefVOS, image_folder=os.path.join(base, "JPEGImages"),
             expression_file=os.path.join(base, "meta_expressions.json"),
             mask_file=os.path.join(base, "mask_dict.json"), tokenizer=tok_cfg, repeats=2, num_clips=4,
             grid_size=2, **SMALL),
    ])
    n_img = len(concat.datasets[0])
    assert len(concat) == n_img + 6 and len(concat.modality_length) == len(concat)
    sampler = LengthGroupedSampler(concat, per_device_batch_size=2, length_property="modality_length", seed=0)
    assert set(sampler) == set(range(len(concat)))  # the tail (video items) is reachable
    loader = DataLoader(concat, batch_size=2, sampler=sampler, num_workers=2, collate_fn=sasasa2va_collate_fn)
    seen = 0
    for batch in loader:
        d = batch["data"]
        assert sum(d["frames_per_batch"]) == len(d["g_pixel_values"])
        assert len(d["masks"]) == len(d["pixel_values"]) == d["input_ids"].shape[0]
        for m, f in zip(d["masks"], d["frames_per_batch"]):
            assert m.shape[0] == 5 * f
        seen += d["input_ids"].shape[0]
    assert seen == len(sampler)


def test_tiny_qwen_tokenizer_config(root, tmp_path):
    """The project's tiny Qwen2-style tokenizer through a config dict (as the training configs pass it)."""
    from transformers import AutoTokenizer

    from projects.sasasa2va.models.tiny import build_tiny_tokenizer, save_tokenizer

    save_tokenizer(build_tiny_tokenizer(0), str(tmp_path / "tok"))
    cfg = dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=str(tmp_path / "tok"),
               trust_remote_code=True, padding_side="right")
    ds = mevis(root, cfg, template_name="qwen_chat")
    tok = ds.tokenizer
    s = ds[0]
    head = tok.encode("<|im_start|>user", add_special_tokens=False)
    assert s["input_ids"][:len(head)] == head  # Qwen: no BOS
    assert s["input_ids"].count(seg_id(tok)) == 50
    assert s["input_ids"].count(tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)) == s["num_image_tokens"] == 80
    assert check_labels(tok, s, video_answers(10), template="qwen_chat") == 5
    im = refcoco(root, cfg, template_name="qwen_chat")[0]
    assert im["input_ids"].count(seg_id(tok)) == 5
