"""Overlay GIFs and the index page (one GIF per expression, one GIF frame per video frame)."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from projects.sasasa2va.datasets.rle import encode_mask
from projects.sasasa2va.evaluation.results_io import make_entry, write_results
from projects.sasasa2va.evaluation.visualize import visualize_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, H, W = 5, 60, 80


def make_split(root):
    frames = [f"{i:05d}" for i in range(T)]
    os.makedirs(os.path.join(root, "JPEGImages", "vid"))
    for i, f in enumerate(frames):
        Image.fromarray(np.full((H, W, 3), 40, np.uint8)).save(os.path.join(root, "JPEGImages", "vid", f + ".jpg"))
    gt = np.zeros((T, H, W), bool)
    gt[:, 10:30, 20:40] = True
    meta = {"videos": {"vid": {"frames": frames, "expressions": {
        "0": {"exp": "the <red> car", "obj_id": [0], "anno_id": ["0"]},
        "1": {"exp": "the dog", "obj_id": [1], "anno_id": ["1"]}}}}}
    json.dump(meta, open(os.path.join(root, "meta_expressions.json"), "w"))
    json.dump({"0": [encode_mask(g) for g in gt], "1": [None] * T},
              open(os.path.join(root, "mask_dict.json"), "w"))
    return gt, frames


def make_page(tmp_path):
    """The split above, its results and metrics, visualised into tmp_path/vis: (split, results, out, items)."""
    split = str(tmp_path / "split")
    gt, frames = make_split(split)
    results = str(tmp_path / "results.json")
    write_results(results, [make_entry(0, "vid", "0", frames, gt), make_entry(1, "vid", "1", frames, gt)],
                  {"split": "tiny"})
    csv = tmp_path / "per_exp.csv"
    csv.write_text("video,exp_id,J,F,J&F,num_frames\nvid,0,1.0,1.0,1.0,5\nvid,1,0.0,0.0,0.0,5\n")
    out = str(tmp_path / "vis")
    items = visualize_split(split, results, out, metrics_path=str(csv), max_side=64)
    return split, results, out, items


def test_gif_and_index(tmp_path):
    split, results, out, items = make_page(tmp_path)
    assert [it["gif"] for it in items] == ["gifs/vid/0.gif", "gifs/vid/1.gif"]
    im = Image.open(os.path.join(out, "gifs", "vid", "0.gif"))
    assert im.n_frames == T
    assert im.size == (2 * 64, 48 + 4)                  # prediction | GT side by side, downscaled, + bar
    page = open(os.path.join(out, "index.html")).read()
    assert 'src="gifs/vid/0.gif"' in page and 'src="gifs/vid/1.gif"' in page
    assert "the &lt;red&gt; car" in page and "100.00" in page
    # CLI with a cap on the number of expressions
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "visualize.py"), "--split-dir", split,
                        "--results", results, "--out", str(tmp_path / "vis2"), "--max-expressions", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path / "vis2" / "gifs" / "vid") == ["0.gif"]


def test_other_splits_results_and_bad_arguments_are_refused(tmp_path):
    split, results, out, _ = make_page(tmp_path)
    frames = [f"{i:05d}" for i in range(T)]
    other = str(tmp_path / "other.json")
    write_results(other, [make_entry(0, "vidZ", "0", frames, np.zeros((T, H, W), bool))], {"split": "x"})
    tool = [sys.executable, os.path.join(ROOT, "tools", "visualize.py"), "--split-dir", split]
    r = subprocess.run(tool + ["--results", other, "--out", str(tmp_path / "vis3")], capture_output=True, text=True)
    assert r.returncode == 2 and "another split" in r.stderr and not (tmp_path / "vis3").exists()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for extra, message in ((["--out", str(afile)], "exists and is not a folder"),
                           (["--out", out, "--fps", "0"], "--fps must be > 0"),
                           (["--out", out, "--max-expressions", "0"], "must be >= 1")):
        r = subprocess.run(tool + ["--results", results, *extra], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert afile.read_text() == "mine"


def test_gif_frames_keep_the_composed_pixels(tmp_path):
    """The GIF's own quantizer (fast octree) keeps every frame, the overlay's tint and the photo's colours."""
    from projects.sasasa2va.evaluation.visualize import PRED_COLOR, compose_frame, write_gif

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:200]
    photo = np.stack([xx * 255 // 199, yy * 255 // 119, (xx + yy) * 255 // 318], -1).astype(np.uint8)
    mask = np.zeros((120, 200), bool)
    mask[30:90, 50:150] = True
    frames = [np.clip(photo.astype(int) + rng.integers(-8, 9, photo.shape), 0, 255).astype(np.uint8)
              for _ in range(4)]
    panels = [compose_frame(f, mask, caption=f"{k + 1}/4", progress=(k + 1) / 4) for k, f in enumerate(frames)]
    out = tmp_path / "q.gif"
    write_gif(panels, str(out))
    with Image.open(out) as gif:
        assert gif.n_frames == len(panels)
        for k, panel in enumerate(panels):
            gif.seek(k)
            got = np.asarray(gif.convert("RGB")).astype(int)
            want = np.asarray(panel).astype(int)
            assert got.shape == want.shape
            assert np.abs(got - want).mean() < 6, k          # a web-safe palette: ~15
            inner = (slice(40, 80), slice(60, 140))          # tinted, away from the outline and the caption
            tint = 0.55 * frames[k][inner].astype(float) + 0.45 * np.asarray(PRED_COLOR, float)
            assert np.abs(got[inner].mean((0, 1)) - tint.mean((0, 1))).max() < 6, k
