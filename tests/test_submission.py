"""MeViS submission PNGs and zip (spec evaluation.md §4.5-4.6): round trip, completeness check, layout."""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from projects.sasasa2va.evaluation.results_io import make_entry, write_results
from projects.sasasa2va.evaluation.submission import check_submission, pack_submission, write_submission_pngs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"vidA": (12, 16), "vidB": (10, 14)}   # (H, W) per video
EXPS = {"vidA": ["0", "1", "10"], "vidB": ["0"]}
T = 3


def make_split(root):
    """Split without ground truth (like MeViS valid): JPEGs + meta_expressions.json."""
    meta = {"videos": {}}
    for vid, (h, w) in SIZES.items():
        frames = [f"{i:05d}" for i in range(T)]
        os.makedirs(os.path.join(root, "JPEGImages", vid))
        for f in frames:
            Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(os.path.join(root, "JPEGImages", vid, f + ".jpg"))
        meta["videos"][vid] = {"frames": frames, "expressions": {e: {"exp": f"thing {e}"} for e in EXPS[vid]}}
    with open(os.path.join(root, "meta_expressions.json"), "w") as f:
        json.dump(meta, f)
    return root


@pytest.fixture()
def sub(tmp_path):
    split = make_split(str(tmp_path / "valid"))
    rng = np.random.default_rng(0)
    entries, masks = [], {}
    for vid, (h, w) in SIZES.items():
        for eid in EXPS[vid]:
            m = rng.random((T, h, w)) < 0.4
            masks[(vid, eid)] = m
            entries.append(make_entry(len(entries), vid, eid, [f"{i:05d}" for i in range(T)], m))
    results = str(tmp_path / "run" / "results.json")
    write_results(results, entries, {"split": "valid", "mode": "uniform"})
    ann = str(tmp_path / "run" / "Annotations")
    n = write_submission_pngs(results, ann)
    assert n == T * 4
    return {"split": split, "ann": ann, "masks": masks, "tmp": tmp_path, "results": results}


def test_round_trip_values_and_no_temp_files(sub):
    for (vid, eid), m in sub["masks"].items():
        d = os.path.join(sub["ann"], vid, eid)
        assert sorted(os.listdir(d)) == ["00000.png", "00001.png", "00002.png"]
        for i in range(T):
            im = Image.open(os.path.join(d, f"{i:05d}.png"))
            assert im.mode == "L"
            a = np.asarray(im)
            assert set(np.unique(a)) <= {0, 255}
            assert np.array_equal(a == 255, m[i])
    assert check_submission(sub["ann"], sub["split"]) == []


def test_rewrite_clears_temp_files_of_a_killed_writer(sub):
    """A kill mid-write leaves .<frame>.png.<pid>.tmp; the rerun (another pid) removes it, else the packer's
    check would refuse the folder for good."""
    vid, eid = next(iter(sub["masks"]))
    d = os.path.join(sub["ann"], vid, eid)
    with open(os.path.join(d, ".00001.png.999999.tmp"), "wb") as f:
        f.write(b"\x89PNG cut short")
    assert any("unexpected file" in p for p in check_submission(sub["ann"], sub["split"]))
    write_submission_pngs(sub["results"], sub["ann"])
    assert sorted(os.listdir(d)) == ["00000.png", "00001.png", "00002.png"]
    assert check_submission(sub["ann"], sub["split"]) == []


def test_missing_frame_expression_and_video_detected(sub):
    os.remove(os.path.join(sub["ann"], "vidA", "1", "00002.png"))
    probs = check_submission(sub["ann"], sub["split"])
    assert len(probs) == 1 and "vidA/1/00002.png" in probs[0] and "missing" in probs[0]
    import shutil
    shutil.rmtree(os.path.join(sub["ann"], "vidB"))
    shutil.rmtree(os.path.join(sub["ann"], "vidA", "10"))
    probs = check_submission(sub["ann"], sub["split"])
    assert any(p.startswith("vidB:") for p in probs) and any("vidA/10" in p for p in probs)
    with pytest.raises(ValueError, match="vidA/1/00002.png"):
        pack_submission(sub["ann"], str(sub["tmp"] / "out.zip"), sub["split"])
    assert not os.path.exists(sub["tmp"] / "out.zip")


def test_wrong_size_values_and_extras_detected(sub):
    p = os.path.join(sub["ann"], "vidA", "0", "00001.png")
    Image.fromarray(np.zeros((10, 14), np.uint8), "L").save(p)          # vidB's size, not vidA's
    q = os.path.join(sub["ann"], "vidB", "0", "00000.png")
    Image.fromarray(np.ones((10, 14), np.uint8), "L").save(q)           # value 1, not 255
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(os.path.join(sub["ann"], "vidA", "1", "00000.png"))
    os.makedirs(os.path.join(sub["ann"], "stray_video"))
    probs = check_submission(sub["ann"], sub["split"], workers=2)
    text = "\n".join(probs)
    assert "vidA/0/00001.png: size 14x10 != frame size 16x12" in text
    assert "vidB/0/00000.png: values other than 0/255" in text
    assert "vidA/1/00000.png: not 8-bit grayscale" in text
    assert "stray_video: unexpected" in text
    assert len(probs) == 4


def test_pngs_written_in_threads_equal_the_serial_ones(sub):
    """workers > 1: the same files byte for byte; an expression listed twice is written by one entry after
    the other (the later one's masks stay); a bad entry still stops the writing with its message."""
    threaded = str(sub["tmp"] / "threaded")
    assert write_submission_pngs(sub["results"], threaded, workers=3) == T * 4
    files = sorted(os.path.relpath(os.path.join(d, f), sub["ann"]) for d, _, fs in os.walk(sub["ann"]) for f in fs)
    assert len(files) == T * 4
    for f in files:
        with open(os.path.join(sub["ann"], f), "rb") as a, open(os.path.join(threaded, f), "rb") as b:
            assert a.read() == b.read(), f
    h, w = SIZES["vidA"]
    names = [f"{i:05d}" for i in range(T)]
    first, second = np.zeros((T, h, w), bool), np.ones((T, h, w), bool)
    entries = [make_entry(0, "vidA", "0", names, first), make_entry(1, "vidB", "0", names, np.zeros((T, 10, 14), bool)),
               make_entry(2, "vidA", "0", names, second)]
    twice = str(sub["tmp"] / "twice")
    assert write_submission_pngs(entries, twice, workers=2) == 3 * T
    for i in range(T):
        assert (np.asarray(Image.open(os.path.join(twice, "vidA", "0", f"{i:05d}.png"))) == 255).all()
    assert sorted(os.listdir(os.path.join(twice, "vidA", "0"))) == [f"{n}.png" for n in names]  # no temp files
    bad = dict(entries[1], frames=names[:1])
    with pytest.raises(ValueError, match="vidB/0: 'frames' must name the frame of each of its 3 prediction_masks"):
        write_submission_pngs([entries[0], bad, entries[2]], str(sub["tmp"] / "bad"), workers=2)


def test_zip_layout(sub):
    out = str(sub["tmp"] / "zips" / "valid.zip")
    info = pack_submission(sub["ann"], out, sub["split"])
    assert info["num_png"] == T * 4 and info["num_videos"] == 2
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        files = [n for n in names if not n.endswith("/")]
        assert {n.split("/")[0] for n in names} == {"vidA", "vidB"}
        assert all(len(n.split("/")) == 3 for n in files)
        assert "vidA/10/00002.png" in files and len(files) == T * 4
        a = np.asarray(Image.open(zf.open("vidB/0/00001.png")))
        assert set(np.unique(a)) <= {0, 255}
    assert os.listdir(sub["tmp"] / "zips") == ["valid.zip"]
    with pytest.raises(ValueError, match="inside"):
        pack_submission(sub["ann"], os.path.join(sub["ann"], "x.zip"), sub["split"])


def test_cli(sub):
    out = str(sub["tmp"] / "cli.zip")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_submission_zip.py"), "--ann-dir",
                        sub["ann"], "--split-dir", sub["split"], "--out", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(out) and "12 PNGs" in r.stdout
    assert "check: 100%" in r.stderr and "zip: 100%" in r.stderr and "2/2" in r.stderr  # bars over the 2 videos
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_submission_zip.py"), "--ann-dir",
                        sub["ann"], "--split-dir", sub["split"], "--out", out, "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "%" not in r.stderr, r.stderr
    os.remove(os.path.join(sub["ann"], "vidB", "0", "00000.png"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_submission_zip.py"), "--ann-dir",
                        sub["ann"], "--split-dir", sub["split"], "--out", out + "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "vidB/0/00000.png" in r.stderr


def test_cli_refuses_other_splits_results_and_non_zip_targets(sub):
    tool = os.path.join(ROOT, "tools", "make_submission_zip.py")

    def cli(*args):
        return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True)

    # results of another split: refused before a single PNG lands in the (good) annotation folder
    other = str(sub["tmp"] / "other" / "results.json")
    write_results(other, [make_entry(0, "vidZ", "0", ["00000"], np.zeros((1, 4, 4), bool))], {"split": "x"})
    before = sorted(os.walk(sub["ann"]))
    r = cli("--results", other, "--ann-dir", sub["ann"], "--split-dir", sub["split"], "--out",
            str(sub["tmp"] / "z.zip"))
    assert r.returncode == 2 and "vidZ: not a video of the split" in r.stderr and "nothing written" in r.stderr
    assert sorted(os.walk(sub["ann"])) == before
    # --out: an earlier zip is replaced; a user's other file or a folder is refused
    notes = sub["tmp"] / "notes.txt"
    notes.write_text("mine")
    r = cli("--ann-dir", sub["ann"], "--split-dir", sub["split"], "--out", str(notes))
    assert r.returncode == 2 and "not a zip file; refusing to overwrite" in r.stderr and notes.read_text() == "mine"
    r = cli("--ann-dir", sub["ann"], "--split-dir", sub["split"], "--out", str(sub["tmp"] / "run"))
    assert r.returncode == 2 and "is a folder" in r.stderr
    z = str(sub["tmp"] / "again.zip")
    for _ in range(2):
        r = cli("--results", sub["results"], "--ann-dir", sub["ann"], "--split-dir", sub["split"], "--out", z)
        assert r.returncode == 0, r.stderr
        assert re.search(r"PNGs: 4exp ", r.stderr), r.stderr  # the writing bar counts the 4 expressions
    assert zipfile.is_zipfile(z)
