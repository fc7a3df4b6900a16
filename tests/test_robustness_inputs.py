"""Bad inputs not covered elsewhere (issue 7 item 1), on hand-made tiny data:

* frames of different sizes within a video: training skips the sample (warning names the file), the
  evaluation runner records the video's expressions as failed;
* empty / whitespace expressions: the strict reader names file and key; evaluation records them as
  failed (reason names file and key) and goes on;
* a mask_dict mask whose size does not match the frames: training skips the sample;
* videos with 1, 2 and 1000 frames (reader, training dataset, runner), 0 frames (clear error, before any
  model is loaded);
* model answers without [SEG], empty, without masks, with masks of the wrong shape, or no dict at all.

Covered elsewhere (not repeated here): corrupt/truncated/missing frames, malformed meta_expressions.json,
mask_dict missing an anno_id or with wrong sizes (test_data_readers.py), selected_frames.json errors,
0/1/2/1000-frame index tables (test_frame_sampling.py), 0/3/15 [SEG] in the model (test_inference.py),
failed-expression recording, resume and multi-process runs with a fake model (test_eval_runner.py).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from projects.sasasa2va.datasets.errors import DataError
from projects.sasasa2va.datasets.readers import expression_masks, load_mask_dict, read_meta_expressions
from projects.sasasa2va.datasets.rle import encode_mask
from projects.sasasa2va.hf.models.frame_sampling import (
    MODES, decode_plan, select_indices, split_clips, training_indices,
)
from projects.sasasa2va.hf.models.templates import eval_prompt

from test_conversation import _train
from test_eval_runner import FakeModel

SMALL = dict(image_size=28, tokens_per_image=4, sam2_image_size=32)
H, W = 12, 16


def _frame(i, size=(W, H)):
    return Image.fromarray(np.full((size[1], size[0], 3), (37 * i) % 255, np.uint8))


def _box(t, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[2:6, (t % (w - 5)):(t % (w - 5)) + 4] = True
    return m


def write_split(root, videos, *, odd_size=None, masks=True):
    """A MeViS-style split folder. ``videos``: {vid: (num_frames, {exp_id: text})}; every expression has
    anno_id [<vid>_0]. ``odd_size``: (vid, frame index, (W, H)) written at another size."""
    os.makedirs(root, exist_ok=True)
    meta, md = {"videos": {}}, {}
    for vid, (n, exps) in videos.items():
        d = os.path.join(root, "JPEGImages", vid)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            size = odd_size[2] if odd_size and odd_size[:2] == (vid, i) else (W, H)
            _frame(i, size).save(os.path.join(d, f"{i:05d}.jpg"))
        meta["videos"][vid] = {"frames": [f"{i:05d}" for i in range(n)],
                               "expressions": {e: {"exp": t, "obj_id": [0], "anno_id": [f"{vid}_0"]}
                                               for e, t in exps.items()}}
        md[f"{vid}_0"] = [encode_mask(_box(t)) for t in range(n)]
    with open(os.path.join(root, "meta_expressions.json"), "w") as f:
        json.dump(meta, f)
    if masks:
        with open(os.path.join(root, "mask_dict.json"), "w") as f:
            json.dump(md, f)
    return root


# ================================================================================================ reader
def test_reader_1_2_and_1000_frame_videos(tmp_path):
    split = write_split(str(tmp_path / "s"), {"one": (1, {"0": "a"}), "two": (2, {"0": "b"})})
    recs = read_meta_expressions(os.path.join(split, "meta_expressions.json"), os.path.join(split, "JPEGImages"),
                                 require_anno_id=True, check_frames=True)
    md = load_mask_dict(os.path.join(split, "mask_dict.json"))
    for vid, n in (("one", 1), ("two", 2)):
        rec = recs[vid]
        assert rec.num_frames == n
        m = expression_masks(rec, "0", md)
        assert m.shape == (n, H, W) and all(np.array_equal(m[t], _box(t)) for t in range(n))
        assert training_indices(n) == sorted(i % n for i in range(100))
    # 1000 frames: the record, every mode's indices and decode plan, training indices (no files needed)
    meta = tmp_path / "long.json"
    meta.write_text(json.dumps({"videos": {"long": {"frames": [f"{i:05d}" for i in range(1000)],
                                                   "expressions": {"0": {"exp": "x"}}}}}))
    rec = read_meta_expressions(str(meta), str(tmp_path))["long"]
    assert rec.num_frames == 1000 and rec.frame_names[-1] == "00999"
    q = sorted(range(0, 1000, 10))
    for mode in MODES:
        s = select_indices(1000, mode, selected=q if mode == "q_frame" else None)
        assert len(s) == 100 and all(0 <= i < 1000 for i in s)
        plan = decode_plan(1000, mode, s)
        assert plan.num_frames == 1000
        assert plan.path == ("C" if mode in ("wrap_around", "q_frame") else "A")
    assert training_indices(1000) == list(range(100))
    assert training_indices(1000, strategy="uniform") == list(range(0, 1000, 10))


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_expression_strict_and_lenient(tmp_path, text, caplog):
    p = tmp_path / "meta_expressions.json"
    p.write_text(json.dumps({"videos": {"v": {"frames": ["0"], "expressions": {"0": {"exp": "ok"},
                                                                              "3": {"exp": text}}}}}))
    with pytest.raises(DataError, match=r"meta_expressions.json: videos\['v'\]\.expressions\['3'\]\.exp must be"):
        read_meta_expressions(str(p), str(tmp_path))
    with caplog.at_level(logging.WARNING):
        rec = read_meta_expressions(str(p), str(tmp_path), allow_empty_text=True)["v"]
    assert rec.expressions["3"].text == text and rec.expressions["0"].text == "ok"
    assert "meta_expressions.json: videos['v'].expressions['3'].exp is empty" in caplog.text
    # a missing or non-string exp stays an error even in lenient mode
    p.write_text(json.dumps({"videos": {"v": {"frames": ["0"], "expressions": {"0": {"exp": 5}}}}}))
    with pytest.raises(DataError, match=r"\['0'\]\.exp must be a non-empty string, got 5"):
        read_meta_expressions(str(p), str(tmp_path), allow_empty_text=True)


# ================================================================================================ training
@pytest.fixture(scope="module")
def tok():
    return _train()


def _train_ds(split, tok, **kw):
    from projects.sasasa2va.datasets.refvos import SaSaSa2VARefVOS

    args = dict(SMALL, tokenizer=tok, max_bad_fraction=0.5, bad_check_min_samples=1000)
    args.update(kw)
    return SaSaSa2VARefVOS(os.path.join(split, "JPEGImages"), os.path.join(split, "meta_expressions.json"),
                           os.path.join(split, "mask_dict.json"), "default", **args)


def test_training_short_videos_and_bad_samples(tmp_path, tok, caplog):
    """1-, 2- and 1000-frame videos give full samples (the long one's masks from its key frames); a video
    with a frame of another size, and one whose mask_dict masks have the wrong size, are skipped with a
    warning naming the file (counted)."""
    exps = {"0": "the box", "1": "the thing"}
    split = write_split(str(tmp_path / "train"), {"one": (1, exps), "two": (2, exps), "mixed": (3, exps),
                                                  "badmask": (3, exps), "long": (1000, exps)},
                        odd_size=("mixed", 2, (W + 4, H)))
    with open(os.path.join(split, "mask_dict.json")) as f:
        md = json.load(f)
    md["badmask_0"] = [encode_mask(np.ones((H + 1, W), bool))] * 3
    with open(os.path.join(split, "mask_dict.json"), "w") as f:
        json.dump(md, f)
    ds = _train_ds(split, tok)
    by_vid = {it.video_id: j for j, it in enumerate(ds.items)}
    seg = tok.convert_tokens_to_ids("[SEG]")
    for vid, n in (("one", 1), ("two", 2)):
        s = ds._prepare(by_vid[vid], np.random.default_rng(0))
        assert s["input_ids"].count(seg) == 50 and s["masks"].shape == (50, H, W)
        assert s["pixel_values"].shape == (20, 3, 28, 28) and len(s["g_pixel_values"]) == 10
        assert s["masks"].sum() > 0 and s["sample_info"]["video_id"] == vid
    long = ds._prepare(by_vid["long"], np.random.default_rng(0))  # 1000 frames: the first 100, 10 clips
    keys = [c[0] for c in split_clips(training_indices(1000), 10)]
    assert keys == list(range(0, 100, 10)) and long["input_ids"].count(seg) == 50
    assert long["masks"].shape == (50, H, W) and len(long["g_pixel_values"]) == 10
    for row in range(50):  # object-major rows: expression row // 10 on key frame keys[row % 10]
        assert np.array_equal(long["masks"][row].numpy().astype(bool), _box(keys[row % 10])), row
    mixed_file = os.path.join(split, "JPEGImages", "mixed", "00002.jpg")
    with pytest.raises(DataError, match=r"mixed/00002.jpg: frame size 20x12 \(WxH\) differs from 16x12"):
        ds._prepare(by_vid["mixed"], np.random.default_rng(0))
    with pytest.raises(DataError, match=r"mask_dict.json: key 'badmask_0' frame 0: mask size \[13, 16\] does not match"):
        ds._prepare(by_vid["badmask"], np.random.default_rng(0))
    with caplog.at_level(logging.WARNING):
        samples = [ds[i] for i in range(len(ds))]
    assert all(s["sample_info"]["video_id"] in ("one", "two", "long") for s in samples)
    assert ds.num_bad >= 2 and ds.num_attempts == len(ds) + ds.num_bad
    msgs = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert any(mixed_file in m for m in msgs) and any("badmask_0" in m for m in msgs)
    # too many bad samples stop the run with a clear error
    strict = _train_ds(split, tok, max_bad_fraction=0.1, bad_check_min_samples=2)
    with pytest.raises(DataError, match="max_bad_fraction"):
        for i in range(len(strict)):
            strict[i]


# ================================================================================================ evaluation
class OddAnswers(FakeModel):
    """The test_eval_runner fake, plus answers a real model could give for special expressions."""

    def predict_forward(self, video, text, tokenizer, mode, selected_fids=None, return_probs=True):
        w, h = video[0].size
        z = np.zeros((len(video), h, w), np.float32)
        if text == eval_prompt("give an empty answer"):
            return {"prediction": "", "prediction_masks": [z > 0], "probabilities": [z], "num_seg": 0,
                    "status": "no_seg"}
        if text == eval_prompt("give no masks"):
            return {"prediction": "", "status": "ok"}
        if text == eval_prompt("give masks of the wrong shape"):
            z = np.zeros((len(video), h + 1, w), np.float32)
            return {"prediction": "[SEG]", "prediction_masks": [z > 0], "probabilities": [z], "status": "ok"}
        if text == eval_prompt("return nothing"):
            return None
        if text == eval_prompt("fifteen segs"):
            out = super().predict_forward(video, text, tokenizer, mode, selected_fids, return_probs)
            out["num_seg"] = 15
            return out
        return super().predict_forward(video, text, tokenizer, mode, selected_fids, return_probs)


def odd_factory(hf_dir, device, dtype, remote_code, rank=0):
    return OddAnswers(), object()


def _evaluate(split_dir, work_dir, modes=("uniform",), **kw):
    from projects.sasasa2va.evaluation.runner import EvalOptions, run_evaluation

    return run_evaluation(EvalOptions(hf_dir="fakehf", dataset="custom", split_dir=split_dir, work_dir=work_dir,
                                      modes=list(modes), model_factory=odd_factory, progress=False, **kw))


EVAL_VIDEOS = {
    "one": (1, {"0": "the only frame"}),
    "two": (2, {"0": "the left box", "1": "give an empty answer"}),
    "long": (1000, {"0": "the long one"}),
    "mixed": (3, {"0": "mixed sizes", "1": "mixed again"}),
    "texts": (3, {"0": "", "1": "   ", "2": "give no masks", "3": "give masks of the wrong shape",
                  "4": "return nothing", "5": "fifteen segs", "6": "a normal box"}),
}


def test_runner_records_bad_inputs_and_odd_answers(tmp_path, capsys):
    from projects.sasasa2va.evaluation.results_io import entry_masks

    split = write_split(str(tmp_path / "split"), EVAL_VIDEOS, odd_size=("mixed", 1, (W, H + 2)), masks=False)
    meta_file = os.path.join(split, "meta_expressions.json")
    summary = _evaluate(split, str(tmp_path / "out"), modes=("uniform", "wrap_around"))
    out = capsys.readouterr().out
    expected_failed = {("two", "1"): "no [SEG]", ("mixed", "0"): "mixed/00001.jpg: frame size 16x14",
                       ("mixed", "1"): "differs from 16x12",
                       ("texts", "0"): f"{meta_file}: videos['texts'].expressions['0'].exp is empty",
                       ("texts", "1"): f"{meta_file}: videos['texts'].expressions['1'].exp is empty",
                       ("texts", "2"): "without prediction_masks", ("texts", "3"): "expected [T,H,W] = [3, 12, 16]",
                       ("texts", "4"): "returned NoneType"}
    for mode in ("uniform", "wrap_around"):
        with open(tmp_path / "out" / "modes" / mode / "results.json") as f:
            res = json.load(f)
        assert res["__meta__"]["failed"] == len(expected_failed) and res["__meta__"]["num_expressions"] == 13
        for vid, (n, exps) in EVAL_VIDEOS.items():
            assert list(res[vid]) == list(exps)
            for eid in exps:
                e = res[vid][eid]
                assert len(e["prediction_masks"]) == n and e["frames"][-1] == f"{n - 1:05d}"
                if (vid, eid) in expected_failed:
                    assert e["status"] == "failed", (vid, eid)
                    assert expected_failed[(vid, eid)] in e["error"], (vid, eid, e["error"])
                    assert not entry_masks(e).any()
                else:
                    assert e["status"] == "ok" and e["error"] is None, (vid, eid, e["error"])
                    assert entry_masks(e).shape == (n, H, W) and entry_masks(e).any()
        run = summary["runs"][mode]
        assert run["failed"] == len(expected_failed)
        assert {(v, e) for v, e, _ in run["failures"]} == set(expected_failed)
    # the printed summary lists every failure with its reason
    for (vid, eid), reason in expected_failed.items():
        assert f"failed {vid}/{eid}: " in out
    assert "expressions['0'].exp is empty" in out and "differs from 16x12" in out
    # a rerun resumes everything (failed expressions are final unless --retry-failed)
    again = _evaluate(split, str(tmp_path / "out"), modes=("uniform", "wrap_around"))
    assert again["this_run"]["processed"] == 0 and again["this_run"]["skipped"] == 26
    # the language-blind control replaces the empty texts, so nothing fails for them
    blind = _evaluate(split, str(tmp_path / "blind"), blind_expression="the object", videos=["texts"])
    assert blind["runs"]["uniform"]["failed"] == 0


def test_runner_refuses_a_zero_frame_video_before_loading_the_model(tmp_path):
    split = write_split(str(tmp_path / "split"), {"ok": (2, {"0": "a box"})}, masks=False)
    meta_file = os.path.join(split, "meta_expressions.json")
    with open(meta_file) as f:
        meta = json.load(f)
    meta["videos"]["empty"] = {"frames": [], "expressions": {"0": {"exp": "nothing"}}}
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    loaded = []

    def factory(**kw):
        loaded.append(1)
        return OddAnswers(), object()

    from projects.sasasa2va.evaluation.runner import EvalOptions, run_evaluation

    with pytest.raises(DataError, match=r"meta_expressions.json: videos\['empty'\]\.frames must be a non-empty list"):
        run_evaluation(EvalOptions(hf_dir="fakehf", dataset="custom", split_dir=split,
                                   work_dir=str(tmp_path / "out"), model_factory=factory, progress=False))
    assert loaded == [] and not os.path.exists(tmp_path / "out" / "results.json")
