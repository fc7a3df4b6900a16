"""J / F metrics (spec evaluation.md §5): hand-computed cases, an independent distance-transform check
of the boundary F, and results.json vs PNG-folder parity on a tiny generated split."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from projects.sasasa2va.datasets.rle import encode_mask
from projects.sasasa2va.metrics import (boundary_map, boundary_radius, db_eval_boundary, db_eval_iou,
                                        evaluate_split, jf_from_masks, prepare_gt, score_prepared)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 24, 32  # radius ceil(0.008 * 40) = 1


def square(r0, c0, size, h=H, w=W):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def make_split(root, videos):
    """videos: {vid: {"gt": bool [T,H,W] per exp id}}; writes JPEGImages, meta_expressions.json,
    mask_dict.json (one anno id per expression)."""
    meta, mask_dict, anno = {"videos": {}}, {}, 0
    for vid, exps in videos.items():
        t, h, w = next(iter(exps.values())).shape
        frames = [f"{i:05d}" for i in range(t)]
        os.makedirs(os.path.join(root, "JPEGImages", vid))
        for i, f in enumerate(frames):
            Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)).save(os.path.join(root, "JPEGImages", vid, f + ".jpg"))
        meta["videos"][vid] = {"frames": frames, "expressions": {}}
        for eid, gt in exps.items():
            meta["videos"][vid]["expressions"][eid] = {"exp": f"object {eid} of {vid}", "obj_id": [0],
                                                     "anno_id": [str(anno)]}
            mask_dict[str(anno)] = [encode_mask(g) if g.any() else None for g in gt]
            anno += 1
    with open(os.path.join(root, "meta_expressions.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "mask_dict.json"), "w") as f:
        json.dump(mask_dict, f)
    return root


# ----------------------------------------------------------------------------- hand-computed cases
@pytest.mark.parametrize("gt,pred,j,f", [
    (square(4, 4, 6), square(4, 4, 6), 1.0, 1.0),                      # identical
    (square(1, 1, 5), square(15, 22, 5), 0.0, 0.0),                    # disjoint and far apart
    (np.zeros((H, W), bool), np.zeros((H, W), bool), 1.0, 1.0),        # both empty
    (square(4, 4, 6), np.zeros((H, W), bool), 0.0, 0.0),               # pred empty, GT not
    (np.zeros((H, W), bool), square(4, 4, 6), 0.0, 0.0),               # GT empty, pred not
])
def test_single_frame_cases(gt, pred, j, f):
    assert db_eval_iou(gt, pred) == pytest.approx(j)
    assert db_eval_boundary(gt, pred) == pytest.approx(f)
    assert jf_from_masks(gt, pred) == (pytest.approx(j), pytest.approx(f))


def test_iou_value_and_stack():
    gt = square(0, 0, 4)
    pred = square(0, 2, 4)          # overlap 4x2 = 8, union 24
    assert db_eval_iou(gt, pred) == pytest.approx(8 / 24)
    j = db_eval_iou(np.stack([gt, gt]), np.stack([pred, gt]))
    assert j.shape == (2,) and j[0] == pytest.approx(1 / 3) and j[1] == 1.0


def test_radius():
    assert boundary_radius(720, 1280) == 12
    assert boundary_radius(1080, 1920) == 18
    assert boundary_radius(480, 854) == 8
    assert boundary_radius(720, 1280, bound_th=3) == 3


def test_boundary_map_filled_square():
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True                       # rows/cols 2..5
    expected = np.zeros((8, 8), bool)        # outline of [1..5] x [1..5]: shifted half a pixel to the origin
    expected[1, 1:6] = expected[5, 1:6] = expected[1:6, 1] = expected[1:6, 5] = True
    assert np.array_equal(boundary_map(m), expected)
    assert boundary_map(m).sum() == 16


def test_boundary_map_image_border_is_not_a_contour():
    assert not boundary_map(np.ones((6, 7), bool)).any()
    m = np.zeros((6, 7), bool)
    m[:, -1] = True                          # only the last column
    b = boundary_map(m)
    assert b[:, -2].all() and not b[:, -1].any() and b.sum() == 6
    m = np.zeros((6, 7), bool)
    m[-1, :] = True                          # only the last row
    b = boundary_map(m)
    assert b[-2, :].all() and not b[-1, :].any()
    m = np.zeros((6, 7), bool)
    m[-1, -1] = True                         # bottom-right pixel: seen only by its upper-left neighbours
    b = boundary_map(m)
    assert not b[-1, -1] and b[-2, -2] and b[-1, -2] and b[-2, -1] and b.sum() == 3


def test_one_pixel_shift_is_within_tolerance():
    gt, pred = square(5, 5, 10), square(5, 6, 10)
    assert boundary_radius(H, W) == 1
    assert db_eval_boundary(gt, pred) == pytest.approx(1.0)
    assert db_eval_iou(gt, pred) == pytest.approx(90 / 110)
    far = square(5, 9, 10)                   # 4 px shift: edges out of tolerance
    assert db_eval_boundary(gt, far) < 1.0


def _reference_f(gt, pred, r):
    """Independent F: boundary by explicit neighbour loops, tolerance by Euclidean distance <= r."""
    def bmap(m):
        h, w = m.shape
        b = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                nb = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
                b[y, x] = any(m[y, x] != m[yy, xx] for yy, xx in nb if yy < h and xx < w)
        return b

    def within(b):
        if not b.any():
            return np.zeros_like(b)
        return ndimage.distance_transform_edt(~b) <= r

    gb, pb = bmap(gt), bmap(pred)
    if not gb.any() and not pb.any():
        return 1.0
    if not gb.any() or not pb.any():
        return 0.0
    p = (pb & within(gb)).sum() / pb.sum()
    rc = (gb & within(pb)).sum() / gb.sum()
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_boundary_matches_independent_reference_on_random_masks():
    rng = np.random.default_rng(0)
    h, w = 30, 300                           # radius ceil(0.008 * 301.5) = 3
    for k in range(6):
        gt = ndimage.binary_opening(rng.random((h, w)) < 0.5, iterations=1)
        pred = gt.copy() if k == 0 else ndimage.binary_opening(rng.random((h, w)) < 0.4 + 0.05 * k)
        if k == 5:
            pred = np.zeros((h, w), bool)
        assert db_eval_boundary(gt, pred) == pytest.approx(_reference_f(gt, pred, 3), abs=1e-12)


def test_boundary_on_small_objects_and_image_borders():
    """F is computed on a window around the objects; it must equal the full-frame reference."""
    rng = np.random.default_rng(2)
    h, w = 40, 60                            # radius 1
    spots = [(0, 0), (h - 6, w - 7), (0, w - 5), (h - 4, 0), (15, 25)]
    for (r, c) in spots:
        for (r2, c2) in spots:
            gt = np.zeros((h, w), bool)
            pred = np.zeros((h, w), bool)
            gt[r:r + 6, c:c + 7] = rng.random((min(6, h - r), min(7, w - c))) < 0.7
            pred[r2:r2 + 5, c2:c2 + 5] = True
            assert db_eval_boundary(gt, pred) == pytest.approx(_reference_f(gt, pred, 1), abs=1e-12)
            assert db_eval_boundary(gt, gt) == 1.0


def test_prepared_scoring_equals_direct():
    rng = np.random.default_rng(1)
    gt = rng.random((3, H, W)) < 0.3
    pred = rng.random((3, H, W)) < 0.3
    j, f = score_prepared(prepare_gt(gt), pred)
    assert np.allclose(j, db_eval_iou(gt, pred)) and np.allclose(f, db_eval_boundary(gt, pred))


# ----------------------------------------------------------------------------- split evaluation
@pytest.fixture()
def tiny(tmp_path):
    """Two videos, three expressions, with one prediction set written both as results.json and PNGs."""
    t = 4
    gt_a0 = np.stack([square(2 + i, 3, 8) for i in range(t)])
    gt_a1 = np.stack([square(12, 18, 5) if i < 2 else np.zeros((H, W), bool) for i in range(t)])
    gt_b0 = np.stack([square(6, 6 + i, 7) for i in range(3)])
    split = make_split(str(tmp_path / "split"), {"vidA": {"0": gt_a0, "1": gt_a1}, "vidB": {"0": gt_b0}})
    preds = {
        ("vidA", "0"): gt_a0.copy(),                                              # perfect
        ("vidA", "1"): np.stack([square(12, 19, 5)] * 2 + [np.zeros((H, W), bool)] * 2),
        ("vidB", "0"): np.stack([square(6, 6, 7), np.zeros((H, W), bool), square(6, 8, 7)]),
    }
    results = {"__meta__": {"split": "tiny", "num_videos": 2, "num_expressions": 3, "mode": "uniform"}}
    for (vid, eid), m in preds.items():
        frames = [f"{i:05d}" for i in range(m.shape[0])]
        results.setdefault(vid, {})[eid] = {"video_id": vid, "exp_id": eid, "frames": frames,
                                            "prediction_masks": [encode_mask(x) for x in m]}
        d = tmp_path / "Annotations" / vid / eid
        d.mkdir(parents=True)
        for f, x in zip(frames, m):
            Image.fromarray(x.astype(np.uint8) * 255, "L").save(d / f"{f}.png")
    rpath = tmp_path / "run" / "results.json"
    rpath.parent.mkdir()
    rpath.write_text(json.dumps(results))
    gts = {("vidA", "0"): gt_a0, ("vidA", "1"): gt_a1, ("vidB", "0"): gt_b0}
    return {"split": split, "results": str(rpath), "pred_dir": str(tmp_path / "Annotations"),
            "gts": gts, "preds": preds}


def test_results_json_and_png_folder_agree(tiny):
    a = evaluate_split(tiny["split"], results_path=tiny["results"])
    b = evaluate_split(tiny["split"], pred_dir=tiny["pred_dir"])
    assert a["num_expressions"] == 3 and a["num_videos"] == 2 and not a["missing"]
    assert [(r["video"], r["exp_id"]) for r in a["rows"]] == [("vidA", "0"), ("vidA", "1"), ("vidB", "0")]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra == rb
    for k in ("J", "F", "J&F"):
        assert a[k] == b[k]
    # expression-level numbers from the in-memory function; split level = unweighted mean
    exp = [jf_from_masks(tiny["gts"][k], tiny["preds"][k]) for k in tiny["gts"]]
    assert a["rows"][0]["J"] == 1.0 and a["rows"][0]["F"] == 1.0
    assert a["J"] == pytest.approx(np.mean([e[0] for e in exp]))
    assert a["F"] == pytest.approx(np.mean([e[1] for e in exp]))
    assert a["J&F"] == pytest.approx((a["J"] + a["F"]) / 2)
    # absent target on frames 2,3 of vidA/1 with an empty prediction scores 1 there
    assert a["rows"][1]["J"] == pytest.approx((2 * 20 / 30 + 2) / 4)


def test_missing_expressions_score_zero_missing_frames_empty(tiny, tmp_path):
    """The official scorer gives J = F = 0 to a missing video (spec evaluation §4.6, §5.3): an expression
    without any prediction scores 0 (even where an empty mask would score 0.5); a missing frame of a
    present expression is an empty mask."""
    vid_b = os.path.join(tiny["pred_dir"], "vidB", "0")
    os.remove(os.path.join(vid_b, "00000.png"))
    import shutil
    shutil.rmtree(os.path.join(tiny["pred_dir"], "vidA", "1"))
    with pytest.warns(UserWarning):
        b = evaluate_split(tiny["split"], pred_dir=tiny["pred_dir"])
    assert len(b["missing"]) == 2
    assert any("vidA/1" in m and "J = F = 0" in m for m in b["missing"])
    assert any("00000.png" in m and "scored as empty" in m for m in b["missing"])
    empty = jf_from_masks(tiny["gts"][("vidA", "1")], np.zeros((4, H, W), bool))
    assert empty[0] == pytest.approx(0.5) and b["rows"][1]["J"] == 0.0 and b["rows"][1]["F"] == 0.0
    pred_b = np.stack([np.zeros((H, W), bool)] + [_read_png(os.path.join(vid_b, f"{i:05d}.png")) for i in (1, 2)])
    want_b = jf_from_masks(tiny["gts"][("vidB", "0")], pred_b)
    assert b["rows"][2]["J"] == pytest.approx(want_b[0]) and b["rows"][2]["F"] == pytest.approx(want_b[1])
    # results.json missing an expression is scored the same way
    res = json.load(open(tiny["results"]))
    del res["vidA"]["1"]
    p = tmp_path / "r2.json"
    p.write_text(json.dumps(res))
    with pytest.warns(UserWarning):
        a = evaluate_split(tiny["split"], results_path=str(p))
    assert a["rows"][1]["J"] == 0.0 and len(a["missing"]) == 1


def _read_png(path):
    return np.array(Image.open(path)) != 0


def test_workers_give_same_numbers(tiny):
    a = evaluate_split(tiny["split"], results_path=tiny["results"], workers=1)
    b = evaluate_split(tiny["split"], results_path=tiny["results"], workers=2)
    assert a["rows"] == b["rows"]


def test_errors_name_the_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate_split(tiny["split"], results_path=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="meta_expressions"):
        evaluate_split(str(tmp_path), results_path=tiny["results"])
    with pytest.raises(ValueError):
        evaluate_split(tiny["split"])


def test_cli_last_line(tiny, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval_mevis.py"), "--split-dir", tiny["split"],
           "--results", tiny["results"]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"J&F (\d+\.\d\d) J (\d+\.\d\d) F (\d+\.\d\d)", last)
    assert m, last
    ref = evaluate_split(tiny["split"], results_path=tiny["results"])
    assert float(m.group(1)) == round(100 * ref["J&F"], 2)
    run_dir = os.path.dirname(tiny["results"])
    summary = json.load(open(os.path.join(run_dir, "mevis_valu.json")))
    assert summary["J&F"] == float(m.group(1)) and summary["num_expressions"] == 3
    assert os.path.isfile(os.path.join(run_dir, "mevis_valu_per_expression.csv"))
    assert "J&F: 100%" in out.stderr and "3/3" in out.stderr  # the progress bar (stdout stays parseable)
    quiet = subprocess.run(cmd + ["--no-progress", "--workers", "1"], capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 0 and "%" not in quiet.stderr and quiet.stdout.strip().splitlines()[-1] == last
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.json")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_other_splits_results_refused_and_partial_runs(tiny, tmp_path):
    res = json.load(open(tiny["results"]))
    foreign = dict(res, vidZ={"0": res["vidA"]["0"]})
    p = tmp_path / "foreign.json"
    p.write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match=r"1 prediction\(s\) for expressions that .* does not have \(first: vidZ/0\)"):
        evaluate_split(tiny["split"], results_path=str(p))
    # a partial run (only vidA): absent expressions score as empty masks, or are left out with only_present
    part = {"__meta__": {"subset": True}, "vidA": res["vidA"]}
    q = tmp_path / "part.json"
    q.write_text(json.dumps(part))
    with pytest.warns(UserWarning):
        everything = evaluate_split(tiny["split"], results_path=str(q))
    present = evaluate_split(tiny["split"], results_path=str(q), only_present=True)
    full = evaluate_split(tiny["split"], results_path=tiny["results"])
    assert everything["num_expressions"] == 3 and present["num_expressions"] == 2 and present["num_videos"] == 1
    assert not present["missing"] and present["rows"] == [r for r in full["rows"] if r["video"] == "vidA"]
    tool = os.path.join(ROOT, "tools", "eval_mevis.py")
    out = subprocess.run([sys.executable, tool, "--split-dir", tiny["split"], "--results", str(q),
                          "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "comes from a partial run" in out.stderr and "--only-present" in out.stderr
    assert "warning: " in out.stderr and "warnings.warn" not in out.stderr  # no echoed source lines
    out = subprocess.run([sys.executable, tool, "--split-dir", tiny["split"], "--results", str(p)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "another split" in out.stderr


def test_pred_dir_of_another_split_empty_or_corrupt(tiny, tmp_path):
    import shutil

    pred = tmp_path / "pred"
    shutil.copytree(tiny["pred_dir"], pred)
    (pred / "vidZ" / "0").mkdir(parents=True)
    with pytest.raises(ValueError, match="folder.*first: vidZ.*another split"):
        evaluate_split(tiny["split"], pred_dir=str(pred))
    shutil.rmtree(pred / "vidZ")
    victim = sorted((pred / "vidA" / "0").iterdir())[0]
    victim.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{victim.name}: not a readable PNG mask"):
        evaluate_split(tiny["split"], pred_dir=str(pred))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no video folder of the split"):
        evaluate_split(tiny["split"], pred_dir=str(empty))


def test_no_prediction_at_all_scores_zero_and_foreign_expression_folders(tiny, tmp_path):
    import shutil

    res = json.load(open(tiny["results"]))
    res["vidA"]["1"]["prediction_masks"] = []
    p = tmp_path / "r.json"
    p.write_text(json.dumps(res))
    with pytest.warns(UserWarning):
        a = evaluate_split(tiny["split"], results_path=str(p))
    assert a["rows"][1]["J"] == 0.0 and "no prediction_masks" in a["missing"][0]
    pred = tmp_path / "pred"
    shutil.copytree(tiny["pred_dir"], pred)
    for f in (pred / "vidA" / "1").iterdir():
        f.unlink()  # the folder is there, its PNGs are not
    (pred / "__MACOSX" / "vidA").mkdir(parents=True)  # an unzipped archive's metadata: ignored
    with pytest.warns(UserWarning):
        b = evaluate_split(tiny["split"], pred_dir=str(pred))
    assert b["rows"][1]["J"] == 0.0 and any("no PNG in" in m for m in b["missing"])
    (pred / "vidA" / "7").mkdir()  # an expression id the split does not have (e.g. another MeViS version)
    with pytest.raises(ValueError, match="first: vidA/7"):
        evaluate_split(tiny["split"], pred_dir=str(pred))


def test_cli_kill_between_csv_and_json_leaves_no_stale_summary(tiny, tmp_path, monkeypatch):
    """A summary JSON of an earlier scoring never sits beside a newer CSV: it goes before the CSV is written,
    so a kill between the two writes leaves the CSV alone (a rerun writes both)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import eval_mevis
    finally:
        sys.path.pop(0)
    csv_path, json_path = tmp_path / "s.csv", tmp_path / "s.json"
    json_path.write_text('{"J&F": 12.0, "source": "an earlier run"}')

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill after the CSV

    monkeypatch.setattr(eval_mevis, "atomic_write_json", killed)
    args = eval_mevis.parse_args(["--split-dir", tiny["split"], "--results", tiny["results"]])
    with pytest.raises(KeyboardInterrupt):
        eval_mevis.score_and_report(args, str(csv_path), str(json_path))
    assert csv_path.is_file() and not json_path.exists()
