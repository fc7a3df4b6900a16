"""Bad inputs of the evaluation-side command-line tools end with `error: ...` (or an argparse usage error
naming the option) and status 2, before any model or data is built; never with a traceback, a silent
default, or a failure after the work (README: "Bad inputs end with `error: ...` and status 2 in every
tool")."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_averaging import GT, make_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A split with ground truth, two runs' probabilities, a results.json, a chosen set, a frame folder
    and an ordinary file ``afile`` (output paths under it must be refused)."""
    from projects.sasasa2va.evaluation import averaging as avg
    from projects.sasasa2va.evaluation.results_io import make_entry, write_results

    root = tmp_path_factory.mktemp("cli_errors")
    split = make_split(str(root / "valid_u"), GT)
    for name in ("uniform", "q_frame"):
        for (vid, eid), gt in GT.items():
            avg.save_probs(str(root / "runs" / name), vid, eid, np.where(gt, 0.9, 0.1).astype(np.float32))
    results = str(root / "run" / "results.json")
    write_results(results, [make_entry(i, vid, eid, [f"{t:05d}" for t in range(gt.shape[0])], gt)
                            for i, ((vid, eid), gt) in enumerate(GT.items())], {"split": "valid_u", "mode": "uniform"})
    (root / "chosen.json").write_text(json.dumps({"names": ["uniform", "q_frame"]}))
    (root / "frames").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "frames" / f"{i}.png")
    (root / "afile").write_text("mine")
    return {"root": root, "split": split, "runs": str(root / "runs"), "results": results,
            "chosen": str(root / "chosen.json"), "frames": str(root / "frames"), "afile": str(root / "afile")}


def refused(capsys, call, *fragments) -> str:
    """``call()`` ends with status 2 (returned, or argparse's SystemExit), its stderr is `error: ...` or a
    usage error and names every fragment, and it holds no traceback."""
    try:
        code = call()
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") or (err.startswith("usage: ") and ": error: " in err), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------- utils/cli.py
def test_output_dir_problem(tmp_path):
    from projects.sasasa2va.utils.cli import output_dir_problem

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert output_dir_problem(str(tmp_path), "--out") is None
    assert output_dir_problem(str(tmp_path / "new" / "deeper"), "--out") is None
    assert output_dir_problem(str(afile), "--out") == f"--out {afile}: exists and is not a folder"
    assert output_dir_problem(str(afile / "v"), "--work-dir") == \
        f"--work-dir {afile / 'v'}: {afile} is a file, not a folder"


def test_positive_int_and_resolve_device(monkeypatch):
    import argparse

    from projects.sasasa2va.utils.cli import positive_int, resolve_device

    assert positive_int("3") == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1"):
            positive_int(bad)
    no_cuda(monkeypatch)
    assert resolve_device(None) == resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"


# ------------------------------------------------------------------------------------------- scoring tools
@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_must_be_positive(world, capsys, tmp_path, workers):
    from tools import eval_mevis, make_submission_zip, select_modes

    w = world
    refused(capsys, lambda: eval_mevis.main(["--split-dir", w["split"], "--results", w["results"],
                                             "--csv", str(tmp_path / "x.csv"), "--json", str(tmp_path / "x.json"),
                                             "--workers", workers]), "--workers", ">= 1")
    refused(capsys, lambda: make_submission_zip.main(["--ann-dir", str(tmp_path / "ann"), "--split-dir", w["split"],
                                                      "--out", str(tmp_path / "o.zip"), "--workers", workers]),
            "--workers")
    refused(capsys, lambda: select_modes.main(["--runs", w["runs"], "--split-dir", w["split"],
                                               "--out", str(tmp_path / "c.json"), "--workers", workers]), "--workers")
    assert os.listdir(tmp_path) == []


def test_eval_mevis_output_under_a_file(world, capsys):
    from tools import eval_mevis

    refused(capsys, lambda: eval_mevis.main(["--split-dir", world["split"], "--results", world["results"],
                                             "--csv", os.path.join(world["afile"], "x.csv")]),
            "--csv", "is a file, not a folder")


def test_make_submission_zip_outputs_checked_before_any_png(world, capsys, tmp_path):
    from tools import make_submission_zip

    w = world
    ann = tmp_path / "ann"
    common = ["--split-dir", w["split"], "--results", w["results"]]
    refused(capsys, lambda: make_submission_zip.main(["--ann-dir", str(ann), "--out",
                                                      os.path.join(w["afile"], "o.zip"), *common]),
            "--out", "is a file, not a folder")
    assert not ann.exists()  # refused before the PNGs were written
    refused(capsys, lambda: make_submission_zip.main(["--ann-dir", w["afile"], "--out", str(tmp_path / "o.zip"),
                                                      *common]), "--ann-dir", "exists and is not a folder")
    assert not (tmp_path / "o.zip").exists() and open(w["afile"]).read() == "mine"


def test_select_modes_members_json_and_members(world, capsys, tmp_path):
    from tools import select_modes

    w = world
    base = ["--runs", w["runs"], "--split-dir", w["split"], "--write-results", str(tmp_path / "e" / "results.json")]
    refused(capsys, lambda: select_modes.main(base + ["--members-json", w["runs"]]), f"--members-json {w['runs']}:")
    missing = str(tmp_path / "nope.json")
    refused(capsys, lambda: select_modes.main(base + ["--members-json", missing]), f"--members-json {missing}:",
            "No such file")
    # a chosen set names its members: --members beside it would be ignored, so the two are exclusive
    refused(capsys, lambda: select_modes.main(base + ["--members", "uniform", "--members-json", w["chosen"]]),
            "--members", "not allowed with")
    assert not (tmp_path / "e").exists()


def test_visualize_out_under_a_file(world, capsys):
    from tools import visualize

    refused(capsys, lambda: visualize.main(["--split-dir", world["split"], "--results", world["results"],
                                            "--out", os.path.join(world["afile"], "v")]),
            "--out", "is a file, not a folder")


# ------------------------------------------------------------------------------------------- demo
@pytest.fixture
def demo(monkeypatch):
    """tools/demo.py with a load_model that fails the test: every check must come before the model."""
    from tools import demo

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(demo, "load_model", load_model)
    no_cuda(monkeypatch)
    return demo


@pytest.mark.parametrize("extra, fragments", [
    (["--out", "AFILE/d.gif"], ["--out", "is a file, not a folder"]),
    (["--save-masks", "--masks-dir", "AFILE/m"], ["--masks-dir", "is a file, not a folder"]),
    (["--fps", "0"], ["--fps must be > 0"]),
    (["--fps", "-3"], ["--fps must be > 0"]),
    (["--fps", "nan"], ["--fps must be > 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens", ">= 1"]),
    (["--max-side", "0"], ["--max-side >= 16"]),
    (["--max-side", "-5"], ["--max-side >= 16"]),
    (["--device", "foo"], ["--device foo: expected cpu, cuda or cuda:N"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
    (["--mode", "q_frame", "--selected-fids", "NOPE"], ["--selected-fids", "nope.json: no such file"]),
])
def test_demo_refuses_bad_options_before_the_model(world, demo, capsys, tmp_path, extra, fragments):
    where = {"AFILE/d.gif": os.path.join(world["afile"], "d.gif"), "AFILE/m": os.path.join(world["afile"], "m"),
             "NOPE": str(tmp_path / "nope.json")}
    args = ["--model", str(tmp_path / "model"), "--video", world["frames"], "--text", "the dog",
            "--out", str(tmp_path / "d.gif"), *[where.get(a, a) for a in extra]]
    refused(capsys, lambda: demo.main(args), *fragments)
    assert os.listdir(tmp_path) == []


def test_demo_model_errors_are_user_errors(world, capsys, tmp_path):
    from tools import demo

    """A folder that is not an export: `error: ...` from the run (as every bad input), no traceback."""
    refused(capsys, lambda: demo.main(["--model", str(tmp_path / "model"), "--video", world["frames"], "--text", "x",
                                       "--out", str(tmp_path / "d.gif"), "--device", "cpu"]),
            "HF model folder not found")


# ------------------------------------------------------------------------------------------- benchmarks
@pytest.fixture
def bench_tools(monkeypatch):
    """(benchmark_eval, profile_eval) with a model builder that fails the test: the options are checked
    before any model or data is built."""
    from tools import profile_eval

    be = profile_eval.be  # the module profile_eval runs (imported by its file name)

    def load_bench_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(be, "load_bench_model", load_bench_model)
    no_cuda(monkeypatch)
    return be, profile_eval


@pytest.mark.parametrize("extra, fragments", [
    (["--work-dir", "AFILE"], ["--work-dir", "exists and is not a folder"]),
    (["--work-dir", "AFILE/w"], ["--work-dir", "is a file, not a folder"]),
    (["--threads", "-1"], ["--threads", ">= 1"]),
    (["--device", "foo"], ["--device foo: expected cpu, cuda or cuda:N"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
    (["--qframe-file", "NOPE"], ["--qframe-file", "--split-dir"]),
    (["--split-dir", "SPLIT", "--modes", "q_frame", "--qframe-file", "NOPE"], ["--qframe-file", "no such file"]),
    (["--train-steps", "-1"], ["--train-steps must be >= 1"]),
    (["--train-warmup", "-1"], ["--train-warmup >= 0"]),
    (["--time-budget", "-5"], ["--time-budget must be >= 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--repeat", "0"], ["--repeat and --scaling-repeat must be >= 1"]),  # these exited with status 1
    (["--modes", "nope"], ["--modes"]),
])
def test_benchmark_eval_refuses_bad_options_first(world, bench_tools, capsys, tmp_path, extra, fragments):
    be, _ = bench_tools
    where = {"AFILE": world["afile"], "AFILE/w": os.path.join(world["afile"], "w"), "SPLIT": world["split"],
             "NOPE": str(tmp_path / "nope.json")}
    args = ["--work-dir", str(tmp_path / "work"), "--skip-train", *[where.get(a, a) for a in extra]]
    refused(capsys, lambda: be.main(args), *fragments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, fragments", [
    (["--out", "AFILE"], ["--out", "exists and is not a folder"]),
    (["--out", "AFILE/x"], ["--out", "is a file, not a folder"]),
    (["--work-dir", "AFILE"], ["--work-dir", "exists and is not a folder"]),
    (["--top", "0"], ["--top", ">= 1"]),
    (["--top", "-5"], ["--top", ">= 1"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
])
def test_profile_eval_refuses_bad_options_first(world, bench_tools, capsys, tmp_path, extra, fragments):
    _, profile_eval = bench_tools
    where = {"AFILE": world["afile"], "AFILE/x": os.path.join(world["afile"], "x")}
    args = ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *[where.get(a, a) for a in extra]]
    refused(capsys, lambda: profile_eval.main(args), *fragments)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, fragments", [
    (["--batches", "0"], ["--batches, --context, --iters and --layers must be >= 1"]),  # status 1 before
    (["--heads", "5", "--kv-heads", "2"], ["--heads (5) must be a multiple of --kv-heads (2)"]),
    (["--device", "foo"], ["--device foo: expected cpu, cuda or cuda:N"]),
    (["--device", "cuda"], ["--device cuda: no CUDA device"]),
    (["--threads", "-1"], ["--threads", ">= 1"]),
    (["--json", "AFILE/x.json"], ["--json", "is a file, not a folder"]),  # found before the timing, not after
])
def test_benchmark_decode_attention_refuses_bad_options_first(world, capsys, monkeypatch, extra, fragments):
    from tools import benchmark_decode_attention as bda

    def make_case(*args, **kwargs):
        raise AssertionError("timed before the options were checked")

    monkeypatch.setattr(bda, "make_case", make_case)
    no_cuda(monkeypatch)
    extra = [os.path.join(world["afile"], "x.json") if a == "AFILE/x.json" else a for a in extra]
    refused(capsys, lambda: bda.main(["--batches", "1", "--context", "8", "--iters", "1", *extra]), *fragments)


# ------------------------------------------------------------------------------------------- as processes
@pytest.mark.parametrize("tool, args", [
    ("select_modes.py", ["--runs", "RUNS", "--split-dir", "SPLIT", "--members-json", "RUNS", "--write-results",
                         "TMP/e.json"]),
    ("benchmark_decode_attention.py", ["--batches", "0"]),
])
def test_processes_exit_with_status_2(world, tmp_path, tool, args):
    where = {"RUNS": world["runs"], "SPLIT": world["split"], "TMP/e.json": str(tmp_path / "e.json")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *[where.get(a, a) for a in args]],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
