"""Readers, RLE and validation: hand-made tiny fixtures, so every error path is exercised directly."""
from __future__ import annotations

import json
import logging
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
from PIL import Image

from projects.sasasa2va.datasets.errors import DataError
from projects.sasasa2va.datasets.readers import (
    RefSAVRecord,
    annotation_mask,
    check_frame_files,
    expression_masks,
    frame_size,
    load_frame,
    load_mask_dict,
    load_refsav_sample,
    read_meta_expressions,
    read_refcoco,
    read_refsav,
    read_refytvos,
    read_selected_frames,
    record_from_folder,
    safe_pickle_load,
    sam2_path_patch,
)
from projects.sasasa2va.datasets.records import Expression, VideoRecord
from projects.sasasa2va.datasets.rle import decode_rle, encode_mask, merge_masks, rle_area

H, W = 12, 20


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _write_video(root, vid, n, h=H, w=W):
    d = os.path.join(root, vid)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((h, w, 3), 40 * i % 255, np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"))
    return d


def _box(t, h=H, w=W, x0=2):
    m = np.zeros((h, w), bool)
    m[2:6, x0 + t : x0 + t + 4] = True
    return m


@pytest.fixture
def mevis_like(tmp_path):
    """One 3-frame video, 11 expressions (ids sort as strings), two objects, one absent on frame 2."""
    img = tmp_path / "JPEGImages"
    _write_video(str(img), "vidA", 3)
    exps = {str(k): {"exp": f"thing {k}", "obj_id": [0], "anno_id": [7]} for k in range(11)}
    exps["10"] = {"exp": "both things", "obj_id": [0, 1], "anno_id": [7, "8"]}
    meta = {"videos": {"vidA": {"frames": ["00000", "00001", "00002"], "expressions": exps}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    md = {"7": [encode_mask(_box(t)) for t in range(3)],
          "8": [encode_mask(_box(0, x0=12)), encode_mask(_box(0, x0=13)), None]}
    (tmp_path / "mask_dict.json").write_text(json.dumps(md))
    return tmp_path


# ----------------------------------------------------------------------------------------------
# RLE
# ----------------------------------------------------------------------------------------------
def test_rle_round_trip_and_format():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (180, 320)]:
        m = rng.random((h, w)) > 0.6
        r = encode_mask(m)
        assert r["size"] == [h, w] and isinstance(r["counts"], str)
        json.dumps(r)
        assert np.array_equal(decode_rle(r, h, w), m)
        assert rle_area(r) == m.sum()
    assert not decode_rle(None, 4, 5).any() and decode_rle(None, 4, 5).shape == (4, 5)
    # Fortran order: a single pixel at (row 0, col 1) comes after the whole first column
    m = np.zeros((3, 4), bool)
    m[0, 1] = True
    from pycocotools import mask as mu

    assert encode_mask(m)["counts"] == mu.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()


def test_encode_mask_stack_equals_pycocotools():
    """The numpy encoder (run on the evaluation's writer threads without the GIL) gives pycocotools' counts
    strings exactly: empty and full frames, single pixels at both ends, one-pixel-wide shapes, large counts
    (deltas that need several 5-bit groups, negative ones), smooth blobs, noise (the pycocotools fallback),
    non-bool input, and runs that continue from one frame into the next."""
    from projects.sasasa2va.datasets import rle
    from projects.sasasa2va.datasets.rle import encode_mask_stack
    from pycocotools import mask as mu

    def reference(frames):
        out = []
        for f in frames:
            r = mu.encode(np.asfortranarray((np.asarray(f) != 0).astype(np.uint8)))
            out.append({"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")})
        return out

    rng = np.random.default_rng(0)
    corners = np.zeros((2, 6, 6), bool)
    corners[0, 0, 0] = corners[1, -1, -1] = True
    yy, xx = np.mgrid[0:360, 0:640]
    blobs = np.stack([np.hypot(yy - 180, xx - 300 - 9 * t) < 40 + 7 * t for t in range(6)])
    cases = [np.zeros((3, 5, 7), bool), np.ones((3, 5, 7), bool), corners, blobs, rng.random((2, 360, 640)) > 0.5,
             (rng.random((3, 4, 4)) > 0.5).astype(np.uint8) * 7, rng.random((3, 1, 17)) > 0.3,
             rng.random((3, 13, 1)) > 0.3, np.zeros((0, 4, 4), bool)]
    cases += [rng.random((int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))) > rng.random()
              for _ in range(200)]
    stripes = np.zeros((2, 7, 5), bool)
    stripes[0, :, 1] = stripes[0, 3:, 3] = stripes[1, :4, 4] = True  # runs across column ends, into the next frame
    cases += [stripes, np.ones((2, 1, 6), bool), np.ones((2, 6, 1), bool)]
    for masks in cases:
        assert encode_mask_stack(masks) == reference(masks), masks.shape
        if masks.size:  # the numpy encoder itself, also where the density check hands a stack to pycocotools
            m = np.ascontiguousarray(masks != 0)
            assert rle._counts_strings(m, rle._column_major_changes(m)) == reference(masks), masks.shape
    with pytest.raises(DataError, match=r"\[T, H, W\]"):
        encode_mask_stack(np.zeros((4, 5), bool))


def test_rle_size_mismatch_and_bad_input():
    r = encode_mask(np.ones((4, 5), bool))
    with pytest.raises(DataError, match=r"does not match the frame size \[5, 4\]"):
        decode_rle(r, 5, 4, where="f.json: key '3'")
    with pytest.raises(DataError, match="COCO RLE"):
        decode_rle({"counts": "x"}, 4, 5)
    with pytest.raises(DataError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4), bool))
    # uncompressed (list) counts are accepted
    assert decode_rle({"size": [2, 2], "counts": [1, 2, 1]}, 2, 2).tolist() == [[False, True], [True, False]]
    a, b = np.eye(3, dtype=bool), np.fliplr(np.eye(3, dtype=bool))
    assert np.array_equal(merge_masks([a, b]), a | b)


# ----------------------------------------------------------------------------------------------
# safe pickle
# ----------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_safe_pickle_refuses_code(tmp_path):
    p = tmp_path / "evil.p"
    p.write_bytes(pickle.dumps({"a": _Evil()}))
    with pytest.raises(DataError) as ei:
        safe_pickle_load(str(p))
    assert "evil.p" in str(ei.value) and "system" in str(ei.value)


def test_safe_pickle_allows_plain_data(tmp_path):
    data = {"0": [{"size": [1, 2], "counts": b"11"}, None], "s": {1, 2}, "o": OrderedDict(a=1), "t": (1.5, True)}
    for proto in (2, 4):
        p = tmp_path / f"ok{proto}.p"
        p.write_bytes(pickle.dumps(data, protocol=proto))
        assert safe_pickle_load(str(p)) == data
    (tmp_path / "trunc.p").write_bytes(pickle.dumps(data)[:10])
    with pytest.raises(DataError, match="trunc.p"):
        safe_pickle_load(str(tmp_path / "trunc.p"))


# ----------------------------------------------------------------------------------------------
# meta_expressions + mask_dict
# ----------------------------------------------------------------------------------------------
def test_read_meta_and_masks(mevis_like):
    recs = read_meta_expressions(str(mevis_like / "meta.json"), str(mevis_like / "JPEGImages"),
                                 require_anno_id=True, check_frames=True)
    rec = recs["vidA"]
    assert rec.num_frames == 3 and rec.frame_path(1).endswith(os.path.join("vidA", "00001.jpg"))
    assert list(rec.expressions) == ["0", "1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]
    e = rec.expressions["10"]
    assert e.anno_ids == ["7", "8"] and e.obj_ids == [0, 1]
    md = load_mask_dict(str(mevis_like / "mask_dict.json"))
    both = expression_masks(rec, "10", md)
    assert both.shape == (3, H, W) and both.dtype == bool
    for t in range(3):
        expect = _box(t) | (_box(0, x0=12 + t) if t < 2 else np.zeros((H, W), bool))
        assert np.array_equal(both[t], expect)
    sub = expression_masks(rec, "0", md, frame_indices=[2, 0])
    assert np.array_equal(sub[0], _box(2)) and np.array_equal(sub[1], _box(0))


def test_mask_dict_missing_anno_id(mevis_like):
    rec = read_meta_expressions(str(mevis_like / "meta.json"), str(mevis_like / "JPEGImages"))["vidA"]
    md = load_mask_dict(str(mevis_like / "mask_dict.json"))
    del md["8"]
    with pytest.raises(DataError) as ei:
        expression_masks(rec, "10", md)
    msg = str(ei.value)
    assert "mask_dict.json" in msg and "'8'" in msg and "vidA" in msg


def test_mask_dict_wrong_length_and_shape(mevis_like):
    rec = read_meta_expressions(str(mevis_like / "meta.json"), str(mevis_like / "JPEGImages"))["vidA"]
    md = load_mask_dict(str(mevis_like / "mask_dict.json"))
    md["7"] = md["7"][:2]
    with pytest.raises(DataError, match="has 2 frame entries"):
        expression_masks(rec, "0", md)
    md["7"] = [encode_mask(np.ones((H + 1, W), bool))] * 3
    with pytest.raises(DataError, match=r"mask_dict.json: key '7' frame 0: mask size \[13, 20\] does not match"):
        expression_masks(rec, "0", md)


def test_mask_dict_pickle_and_bad_types(tmp_path):
    p = tmp_path / "mask_dict.pkl"
    p.write_bytes(pickle.dumps({3: [None]}))
    assert dict(load_mask_dict(str(p))) == {"3": [None]}
    q = tmp_path / "bad.json"
    q.write_text(json.dumps({"1": {"size": [1, 1]}}))
    with pytest.raises(DataError, match="bad.json: key '1' must map to a list"):
        load_mask_dict(str(q))


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", "not valid JSON"),
        ('{"vids": {}}', "'videos'"),
        ('{"videos": {"v": {"expressions": {}}}}', "no 'frames'"),
        ('{"videos": {"v": {"frames": [], "expressions": {}}}}', "non-empty list"),
        ('{"videos": {"v": {"frames": ["0"]}}}', "no 'expressions'"),
        ('{"videos": {"v": {"frames": ["0"], "expressions": {"0": {"exp": "  "}}}}}', r"\['0'\]\.exp must be a non-empty"),
        ('{"videos": {"v": {"frames": ["0"], "expressions": {"0": {"obj_id": [1]}}}}}', "exp must be a non-empty"),
        ('{"videos": {"v": {"frames": ["0"], "expressions": {"0": {"exp": "a", "obj_id": ["x"]}}}}}', "obj_id must hold integers"),
        ('{"videos": {"v": {"frames": ["0", "0"], "expressions": {}}}}', "duplicate"),
    ],
)
def test_malformed_meta(tmp_path, content, pattern):
    p = tmp_path / "meta_expressions.json"
    p.write_text(content)
    with pytest.raises(DataError, match=pattern) as ei:
        read_meta_expressions(str(p), str(tmp_path))
    assert "meta_expressions.json" in str(ei.value)


def test_meta_missing_file_and_anno_required(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_meta_expressions(str(tmp_path / "nope.json"), str(tmp_path))
    p = tmp_path / "m.json"
    p.write_text('{"videos": {"v": {"frames": ["0"], "expressions": {"0": {"exp": "a"}}}}}')
    assert read_meta_expressions(str(p), str(tmp_path))["v"].expressions["0"].anno_ids == []
    with pytest.raises(DataError, match=r"m.json: videos\['v'\]\.expressions\['0'\] has no 'anno_id'"):
        read_meta_expressions(str(p), str(tmp_path), require_anno_id=True)


def test_unsorted_frames_are_sorted_with_warning(tmp_path, caplog):
    p = tmp_path / "m.json"
    p.write_text('{"videos": {"v": {"frames": ["00002", "00000", "00001"], "expressions": {}}}}')
    with caplog.at_level(logging.WARNING):
        rec = read_meta_expressions(str(p), str(tmp_path))["v"]
    assert rec.frame_names == ["00000", "00001", "00002"]
    assert "not in sorted order" in caplog.text


# ----------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------
def test_missing_and_corrupt_frames(mevis_like):
    rec = read_meta_expressions(str(mevis_like / "meta.json"), str(mevis_like / "JPEGImages"))["vidA"]
    assert load_frame(rec, 0).size == (W, H) and frame_size(rec) == (H, W)
    path1 = rec.frame_path(1)
    data = open(path1, "rb").read()
    with open(path1, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated JPEG
    with pytest.raises(DataError, match="00001.jpg: cannot decode"):
        load_frame(rec, 1)
    with pytest.raises(DataError, match="00001.jpg"):
        check_frame_files(rec, decode=True)
    with open(path1, "wb") as f:
        f.write(b"not a jpeg at all")
    with pytest.raises(DataError, match="00001.jpg"):
        load_frame(rec, 1)
    os.remove(rec.frame_path(2))
    with pytest.raises(DataError, match=r"00002.jpg: frame file not found \(video 'vidA'; 1 of 3"):
        check_frame_files(rec)
    with pytest.raises(DataError, match="00002.jpg"):
        load_frame(rec, 2)
    with pytest.raises(DataError, match="out of range"):
        load_frame(rec, 3)
    with pytest.raises(DataError, match="00002.jpg"):
        read_meta_expressions(str(mevis_like / "meta.json"), str(mevis_like / "JPEGImages"), check_frames=True)


# ----------------------------------------------------------------------------------------------
# Ref-YouTube-VOS
# ----------------------------------------------------------------------------------------------
def test_refytvos_counter(tmp_path):
    img = tmp_path / "JPEGImages"
    _write_video(str(img), "b", 2)
    _write_video(str(img), "a", 2)
    meta = {"videos": {
        "b": {"frames": ["00000", "00001"], "expressions": {"1": {"exp": "x1", "obj_id": "1"}, "0": {"exp": "x0", "obj_id": "2"}}},
        "a": {"frames": ["00000", "00001"], "expressions": {"0": {"exp": "y0", "obj_id": "1"}}},
    }}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    masks = {str(k): [encode_mask(_box(k)), None] for k in range(3)}
    (tmp_path / "mask_dict.pkl").write_bytes(pickle.dumps(masks))
    recs, md = read_refytvos(str(tmp_path / "meta.json"), str(img), str(tmp_path / "mask_dict.pkl"))
    assert list(recs) == ["b", "a"]  # JSON order
    assert recs["b"].expressions["0"].anno_ids == ["0"] and recs["b"].expressions["1"].anno_ids == ["1"]
    assert recs["a"].expressions["0"].anno_ids == ["2"] and recs["b"].expressions["0"].obj_ids == [2]
    m = expression_masks(recs["a"], "0", md)
    assert np.array_equal(m[0], _box(2)) and not m[1].any()
    del masks["2"]
    (tmp_path / "mask_dict.pkl").write_bytes(pickle.dumps(masks))
    with pytest.raises(DataError, match=r"mask_dict.pkl: missing key '2'.*video 'a' expression '0'"):
        read_refytvos(str(tmp_path / "meta.json"), str(img), str(tmp_path / "mask_dict.pkl"))


# ----------------------------------------------------------------------------------------------
# selected_frames.json
# ----------------------------------------------------------------------------------------------
def _records(n_frames=5):
    return {"v": VideoRecord("v", [f"{i:05d}" for i in range(n_frames)], "/x/v",
                             {"0": Expression("0", "a"), "1": Expression("1", "b")})}


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: d["v"]["selected_frames"]["1"].pop(), "exactly 100 frame indices, got 99"),
        (lambda d: d["v"]["selected_frames"]["1"].append(0), "got 101"),
        (lambda d: d["v"]["selected_frames"]["0"].__setitem__(99, 5), "index 5 out of range"),
        (lambda d: d["v"]["selected_frames"]["0"].__setitem__(0, -1), "index -1 out of range"),
        (lambda d: d["v"]["selected_frames"]["0"].__setitem__(3, 1.0), "expected integers"),
        (lambda d: d["v"]["selected_frames"]["0"].__setitem__(3, True), "expected integers"),
        (lambda d: d["v"]["selected_frames"].pop("1"), r"missing \['v'\]\.selected_frames\['1'\]"),
        (lambda d: d.pop("v"), "missing video 'v'"),
        (lambda d: d["v"].pop("selected_frames"), "'selected_frames' object"),
    ],
)
def test_selected_frames_validation(tmp_path, mutate, pattern):
    good = {"v": {"selected_frames": {"0": sorted([i % 5 for i in range(100)]), "1": [4] * 100}}, "extra": {}}
    p = tmp_path / "selected_frames.json"
    p.write_text(json.dumps(good))
    out = read_selected_frames(str(p), _records())
    assert out["v"]["1"] == [4] * 100 and len(out["v"]["0"]) == 100
    mutate(good)
    p.write_text(json.dumps(good))
    with pytest.raises(DataError, match=pattern) as ei:
        read_selected_frames(str(p), _records())
    assert "selected_frames.json" in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Ref-SAV
# ----------------------------------------------------------------------------------------------
def test_sam2_path_patch():
    assert sam2_path_patch("sav_000/sav_train/sav_000/sav_000001.mp4") == "sav_train/sav_000/sav_000001.mp4"
    assert sam2_path_patch("a/sav_001/sav_train/sav_001/x.json") == "a/sav_train/sav_001/x.json"
    assert sam2_path_patch("sav_train/sav_000/x.mp4") == "sav_train/sav_000/x.mp4"
    assert sam2_path_patch("sav_000/sav_train/sav_001/x.mp4") == "sav_000/sav_train/sav_001/x.mp4"


def test_refsav_validation_and_masklet_count(tmp_path):
    import cv2

    (tmp_path / "Ref-SAV.json").write_text(json.dumps({"k": {"video_path": "v.mp4", "anno_path": "v.json", "objects": {"0": {"formated": ""}}}}))
    with pytest.raises(DataError, match=r"Ref-SAV.json: \['k'\].objects\['0'\].formated"):
        read_refsav(str(tmp_path / "Ref-SAV.json"), str(tmp_path))
    # 9 frames at full rate -> 3 kept; masklet with 2 entries must be refused
    wr = cv2.VideoWriter(str(tmp_path / "v.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 24, (32, 16))
    for i in range(9):
        wr.write(np.full((16, 32, 3), 20 * i, np.uint8))
    wr.release()
    obj = encode_mask(np.ones((16, 32), bool))
    (tmp_path / "v.json").write_text(json.dumps({"masklet": [[obj], [obj]]}))
    rec = RefSAVRecord("k", str(tmp_path / "v.mp4"), str(tmp_path / "v.json"), {"0": "x"})
    with pytest.raises(DataError, match="masklet has 2 frames but .*v.mp4 has 3 frames"):
        load_refsav_sample(rec)
    (tmp_path / "v.json").write_text(json.dumps({"masklet": [[obj]] * 3}))
    frames, masks = load_refsav_sample(rec)
    assert len(frames) == 3 and frames[0].shape == (16, 32, 3) and masks["0"].shape == (3, 16, 32)
    rec.objects = {"1": "y"}
    with pytest.raises(DataError, match="needs channel 1"):
        load_refsav_sample(rec)


# ----------------------------------------------------------------------------------------------
# RefCOCO
# ----------------------------------------------------------------------------------------------
def test_refcoco_reader_and_errors(tmp_path):
    inst = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 12}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 8, 1, 8, 6, 1, 6]]},
                            {"id": 6, "image_id": 1, "category_id": 2, "segmentation": encode_mask(np.eye(10, 12, dtype=bool))}]}
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    refs = [{"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "train", "sentences": [{"raw": "Left box.", "sent": "left box"}]},
            {"ref_id": 1, "ann_id": 6, "image_id": 1, "split": "train", "sentences": [{"raw": "diag", "sent": "diag"}]},
            {"ref_id": 2, "ann_id": 6, "image_id": 1, "split": "val", "sentences": [{"raw": "v", "sent": "v"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    imgs = read_refcoco(str(tmp_path), "refs(unc).p")
    assert len(imgs) == 1 and [i.ref_id for i in imgs[0].instances] == [0, 1]
    assert imgs[0].image_path.endswith(os.path.join("coco2014", "train2014", "a.jpg"))
    assert imgs[0].instances[0].sentences == ["Left box."]
    m = annotation_mask(imgs[0].instances[0].segmentation, 10, 12)
    assert m.dtype == bool and 30 <= m.sum() <= 60
    assert np.array_equal(annotation_mask(imgs[0].instances[1].segmentation, 10, 12), np.eye(10, 12, dtype=bool))
    refs[0]["ann_id"] = 99
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\).p: ref 0 names ann_id 99"):
        read_refcoco(str(tmp_path), "refs(unc).p")


# ----------------------------------------------------------------------------------------------
# real long video (shared data)
# ----------------------------------------------------------------------------------------------
def test_real_long_video(shared_data):
    folder = os.path.join(shared_data, "real_video", "bedroom")
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} not present")
    rec = record_from_folder(folder)
    assert rec.video_id == "bedroom" and rec.num_frames == 200
    assert rec.frame_names == sorted(rec.frame_names) and rec.frame_names[0] == "00000"
    check_frame_files(rec)
    assert frame_size(rec, 199) == (540, 960)
    for i in (0, 150, 199):
        im = load_frame(rec, i)
        assert im.mode == "RGB" and im.size == (960, 540)
