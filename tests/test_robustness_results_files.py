"""Malformed results.json entries, stored probabilities, run configs and metrics files: every reader
refuses them with a ValueError naming the file, the video/expression and what was expected (DESIGN.md
"Errors on bad input"), and the tools end with one `error:` line and status 2, never a traceback."""
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from projects.sasasa2va.datasets.rle import encode_mask
from projects.sasasa2va.evaluation import averaging as avg
from projects.sasasa2va.evaluation.results_io import entry_masks, make_entry, read_results, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, H, W = 3, 12, 16
FRAMES = [f"{i:05d}" for i in range(T)]


def _gt() -> np.ndarray:
    m = np.zeros((T, H, W), bool)
    m[:, 2:8, 3:10] = True
    return m


@pytest.fixture()
def world(tmp_path):
    """A split with ground truth (one video, expressions 0 and 1) and a valid results.json of it."""
    split = tmp_path / "valid_u"
    (split / "JPEGImages" / "vid").mkdir(parents=True)
    for f in FRAMES:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(split / "JPEGImages" / "vid" / f"{f}.jpg")
    meta = {"videos": {"vid": {"frames": FRAMES, "expressions": {
        e: {"exp": f"thing {e}", "obj_id": [0], "anno_id": [e]} for e in ("0", "1")}}}}
    (split / "meta_expressions.json").write_text(json.dumps(meta))
    (split / "mask_dict.json").write_text(json.dumps({e: [encode_mask(g) for g in _gt()] for e in ("0", "1")}))
    results = tmp_path / "run" / "results.json"
    write_results(str(results), [make_entry(i, "vid", e, FRAMES, _gt()) for i, e in enumerate(("0", "1"))],
                  {"split": "valid_u", "mode": "uniform"})
    return {"split": str(split), "results": str(results), "tmp": tmp_path}


def doctor(path: str, change) -> str:
    """Rewrite results.json at path with change(data) applied to its parsed content; returns path."""
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def set_entry(value):
    return lambda d: d["vid"].__setitem__("0", value)


def set_masks(value):
    return lambda d: d["vid"]["0"].__setitem__("prediction_masks", value)


def set_mask(value, i=0):
    return lambda d: d["vid"]["0"]["prediction_masks"].__setitem__(i, value)


# ----------------------------------------------------------------------------- 1. results.json entries
@pytest.mark.parametrize("change,expected", [
    pytest.param(set_entry("x"), "entry dict", id="entry-str"),
    pytest.param(set_entry([1, 2]), "entry dict", id="entry-list"),
    pytest.param(set_masks("abc"), "'prediction_masks' must be a list", id="masks-str"),
    pytest.param(set_masks(None), "'prediction_masks' must be a list", id="masks-null"),
    pytest.param(lambda d: d["vid"]["0"].pop("prediction_masks"), "'prediction_masks' must be a list",
                 id="masks-absent"),
    pytest.param(set_mask(5), r"prediction_masks\[0\].*RLE dict", id="mask-int"),
    pytest.param(set_mask("abc"), r"prediction_masks\[0\].*RLE dict", id="mask-str"),
    pytest.param(set_mask({"counts": "0d0"}), r"prediction_masks\[0\].*'size'", id="rle-no-size"),
    pytest.param(set_mask({"size": "ab", "counts": "0d0"}), r"prediction_masks\[0\].*'size'", id="rle-size-str"),
    pytest.param(set_mask({"size": [12, None], "counts": "0d0"}), r"prediction_masks\[0\].*'size'",
                 id="rle-size-null"),
    pytest.param(set_mask({"size": [12, 16], "counts": 7}), r"prediction_masks\[0\].*'counts'", id="rle-counts-int"),
    pytest.param(lambda d: d["vid"]["0"].__setitem__("frames", "abc"), "'frames' must be a list", id="frames-str"),
])
def test_read_results_refuses_malformed_entries(world, change, expected):
    path = doctor(world["results"], change)
    with pytest.raises(ValueError, match=expected) as err:
        read_results(path)
    assert str(err.value).startswith(f"{path}: vid/0")


def test_read_results_refuses_a_meta_that_is_not_an_object(world):
    path = doctor(world["results"], lambda d: d.__setitem__("__meta__", [1]))
    with pytest.raises(ValueError, match="'__meta__' must be"):
        read_results(path)


def test_what_the_project_writes_is_still_read(world):
    """ok and failed entries, null frames, a tagged average, entries without frames (as hand-written ones)."""
    entries = [make_entry(0, "vid", "0", FRAMES, _gt()),
               make_entry(1, "vid", "1", FRAMES, np.zeros((T, H, W), bool), status="failed", error="boom")]
    entries[0]["average_ahead"] = {"run": "r", "members": ["uniform"], "threshold": 0.5}
    entries[1]["prediction_masks"][1] = None
    path = str(world["tmp"] / "ok.json")
    written = write_results(path, entries, {"split": "x"})
    results, meta = read_results(path)
    assert meta == written["__meta__"] and results == {"vid": written["vid"]}
    assert np.array_equal(entry_masks(results["vid"]["0"]), _gt())
    plain = {"vid": {"0": {"prediction_masks": [encode_mask(g) for g in _gt()]}}}
    (world["tmp"] / "plain.json").write_text(json.dumps(plain))
    assert read_results(str(world["tmp"] / "plain.json"))[0] == plain


BAD_COUNTS = {"size": [H, W], "counts": "!!!"}
WRONG_SIZE = encode_mask(np.ones((10, 10), bool))


@pytest.mark.parametrize("rle,expected", [(BAD_COUNTS, "cannot decode RLE counts"),
                                          (WRONG_SIZE, r"mask size \[10, 10\] does not match")])
def test_scoring_names_file_and_expression_of_an_undecodable_mask(world, rle, expected):
    from projects.sasasa2va.metrics import evaluate_split

    path = doctor(world["results"], set_mask(rle))
    with pytest.raises(ValueError, match=expected) as err:
        evaluate_split(world["split"], results_path=path)
    assert str(err.value).startswith(f"{path}: vid/0")


@pytest.mark.parametrize("rle,frame,expected", [(BAD_COUNTS, 0, "cannot decode RLE counts"),
                                                (WRONG_SIZE, 2, r"mask size \[10, 10\] does not match")])
def test_png_writer_viewer_and_averaging_name_file_and_expression(world, rle, frame, expected):
    """(Without a frame size given, the first mask gives it: a later one of another size is the error.)"""
    from projects.sasasa2va.evaluation.submission import write_submission_pngs
    from projects.sasasa2va.evaluation.visualize import visualize_split

    path = doctor(world["results"], set_mask(rle, frame))
    calls = [lambda: write_submission_pngs(path, str(world["tmp"] / "Annotations")),
             lambda: visualize_split(world["split"], path, str(world["tmp"] / "vis")),
             lambda: avg.load_member(os.path.dirname(path), "vid", "0")]
    for call in calls:
        with pytest.raises(ValueError, match=expected) as err:
            call()
        assert str(err.value).startswith(f"{path}: vid/0 prediction_masks[{frame}]: "), call


def test_png_writer_without_any_sized_mask_says_what_it_needs(world):
    from projects.sasasa2va.evaluation.submission import write_submission_pngs

    path = doctor(world["results"], set_masks([None] * T))
    with pytest.raises(ValueError, match="at least one RLE dict") as err:
        write_submission_pngs(path, str(world["tmp"] / "Annotations"))
    assert str(err.value).startswith(f"{path}: vid/0") and "pass height" not in str(err.value)


def test_tools_end_malformed_results_with_one_error_line(world):
    path = doctor(world["results"], set_masks("abc"))
    runs = [[os.path.join(ROOT, "tools", "make_submission_zip.py"), "--results", path, "--split-dir",
             world["split"], "--ann-dir", str(world["tmp"] / "ann"), "--out", str(world["tmp"] / "s.zip")],
            [os.path.join(ROOT, "tools", "eval_mevis.py"), "--split-dir", world["split"], "--results", path]]
    for cmd in runs:
        out = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith(f"error: {path}: vid/0: 'prediction_masks' must be a list"), out.stderr
    assert not (world["tmp"] / "ann").exists() and not (world["tmp"] / "s.zip").exists()


# ----------------------------------------------------------------------------- 2. stored probabilities
def _object_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, probs=np.array([{"a": 1}], dtype=object))
    return buf.getvalue()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((T, H, W), np.uint8))
    return buf.getvalue()


@pytest.mark.parametrize("content", [pickle.dumps({"probs": [1, 2]}), b"hello", _object_npz(), _npy()],
                         ids=["pickle", "text", "object-npz", "plain-npy"])
def test_probability_file_not_written_here_is_named_never_unpickled(tmp_path, content):
    run = str(tmp_path / "uniform")
    path = avg.save_probs(run, "vid", "0", np.zeros((T, H, W)))
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(ValueError, match="not a probability file written by this project") as err:
        avg.load_probs(run, "vid", "0")
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    assert "trust" not in msg and "unsafe" not in msg and "pickle.load" not in msg and "allow_pickle=True" not in msg


def test_selection_names_a_probability_file_of_the_wrong_shape(world):
    runs = world["tmp"] / "runs"
    for name in ("uniform", "q_frame"):
        for e in ("0", "1"):
            avg.save_probs(str(runs / name), "vid", e, _gt().astype(np.float32))
    bad = avg.save_probs(str(runs / "q_frame"), "vid", "1", np.zeros((T, 5, W), np.float32))
    with pytest.raises(ValueError, match=r"shape \[3, 5, 16\], expected \[T, H, W\] = \[3, 12, 16\]") as err:
        avg.greedy_select([str(runs / "uniform"), str(runs / "q_frame")], world["split"])
    assert str(err.value).startswith(f"{bad}: vid/1")


# ----------------------------------------------------------------------------- 3. run_config.json
@pytest.mark.parametrize("content,expected", [("[1]", "a JSON object expected, got list"),
                                              ("", "unreadable JSON"), ("{not json", "unreadable JSON"),
                                              (b"\xff\xfe\x00bin", "unreadable JSON")])
def test_a_work_dir_whose_run_config_is_not_one(tmp_path, content, expected):
    from projects.sasasa2va.evaluation.runner import _check_run_config

    path = tmp_path / "run_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=expected) as err:
        _check_run_config(str(tmp_path), {"mode": "uniform"})
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a run config") and "another --work-dir or --overwrite" in msg


# ----------------------------------------------------------------------------- 4. metrics CSV / JSON
@pytest.mark.parametrize("name,content,expected", [
    ("m.json", b"", "not valid JSON"),
    ("m.json", b"{oops", "not valid JSON"),
    ("m.json", b"\x89PNG\r\n\x1a\n\xff\x00", "not a text file"),
    ("m.json", b"[1, 2]", r"row 1: expected an object"),
    ("m.json", b'{"rows": [{"video": "vid", "exp_id": "0", "J&F": null}]}', "row 1: 'J&F' must be a number"),
    ("m.csv", b"", "empty"),
    ("m.csv", b"\x89PNG\r\n\x1a\n\xff\x00", "not a text file"),
    ("m.csv", b"video,exp_id,J\nvid,0,1.0\n", "columns"),
    ("m.csv", b"[1,2]", "columns"),                                      # a header without rows
    ("m.csv", b"video,exp_id,J&F\nvid,0\n", "row 1: 'J&F' must be a number"),
    ("m.csv", b"video,exp_id,J&F\nvid,0,high\n", "row 1: 'J&F' must be a number"),
])
def test_metrics_file_errors_name_the_file(tmp_path, name, content, expected):
    from projects.sasasa2va.evaluation.visualize import load_metrics

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as err:
        load_metrics(str(path))
    assert str(err.value).startswith(f"{path}: ")


def test_metrics_files_written_by_eval_mevis_still_load(tmp_path):
    from projects.sasasa2va.evaluation.visualize import load_metrics

    (tmp_path / "m.csv").write_text("video,exp_id,J,F,J&F,num_frames\nvid,0,1.0,1.0,1.0,5\nvid,1,0,0,0.25,5\n")
    (tmp_path / "m.json").write_text(json.dumps({"rows": [{"video": "vid", "exp_id": "0", "J&F": 0.5}]}))
    assert load_metrics(str(tmp_path / "m.csv")) == {("vid", "0"): 1.0, ("vid", "1"): 0.25}
    assert load_metrics(str(tmp_path / "m.json")) == {("vid", "0"): 0.5}


def test_visualize_tool_with_a_binary_metrics_file(world):
    csv = world["tmp"] / "per_exp.csv"
    csv.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "visualize.py"), "--split-dir", world["split"],
                          "--results", world["results"], "--out", str(world["tmp"] / "vis"), "--csv", str(csv)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: {csv}: not a text file"), out.stderr


@pytest.mark.parametrize("rle,expected", [
    ({"size": [4, 5], "counts": ""}, "'counts' is empty"),                 # decoded to stale memory before
    ({"size": [4, 5], "counts": [1, 2]}, "summing to H\\*W = 20"),          # likewise
    ({"size": [4, 5], "counts": ["x"]}, "summing to H\\*W = 20"),
    ({"size": [4, 5], "counts": "\u00e9"}, "ASCII"),
    ({"size": ["a", 5], "counts": "0"}, "'size' must be \\[H, W\\]"),
])
def test_rle_decode_errors_name_where(rle, expected):
    from projects.sasasa2va.datasets.errors import DataError
    from projects.sasasa2va.datasets.rle import decode_rle

    with pytest.raises(DataError, match=expected) as err:
        decode_rle(rle, 4, 5, where="F.json: key 7")
    assert str(err.value).startswith("F.json: key 7: ")
