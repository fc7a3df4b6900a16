"""Bad inputs of the data / checkpoint / training / export / evaluation tools end as one ``error: ...`` line
(or an argparse usage error naming the option) and status 2 -- no traceback, no work announced or started
first. Every case fails before a model is built, so the file stays fast."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.hf import convert_to_hf as conv  # noqa: E402
from projects.sasasa2va.utils.cli import run_reporting_user_errors  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, "projects", "sasasa2va", "configs", "sasasa2va_tiny.py")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def synthetic_tool():
    return _tool("make_synthetic_data")


@pytest.fixture(scope="module")
def tiny_tool():
    return _tool("make_tiny_pretrained")


@pytest.fixture(scope="module")
def train_tool():
    return _tool("train")


@pytest.fixture
def afile(tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    return path


def assert_error(rc, err: str, *needles: str) -> None:
    """Status 2 and a one-line ``error: ...`` (mentioning each needle), no traceback."""
    assert rc == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_usage_error(call, capsys, *needles: str) -> None:
    """argparse's usage error (status 2) whose message mentions each needle."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("usage: ") and " error: " in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def config_file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ============================================================================ tools/make_synthetic_data.py
@pytest.mark.parametrize("args, needle", [
    (["--num-train-videos", "-1"], "--num-train-videos must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--motion-expression-prob", "-0.5"], "--motion-expression-prob is a probability, in [0, 1]"),
    (["--motion-expression-prob", "2"], "--motion-expression-prob is a probability, in [0, 1]"),
    (["--formats", ""], "--formats must name at least one of"),
    (["--max-objects", "9"], "--max-objects <= 4"),
])
def test_make_synthetic_data_bad_options_are_error_lines(synthetic_tool, tmp_path, capsys, caplog, args, needle):
    root = tmp_path / "syn"
    rc = synthetic_tool.main(["--root", str(root), "--quiet", *args])
    assert_error(rc, capsys.readouterr().err, needle)
    assert "generating" not in caplog.text and not root.exists()  # refused before any work


def test_make_synthetic_data_root_and_usage_errors(synthetic_tool, afile, capsys, caplog):
    rc = synthetic_tool.main(["--root", str(afile / "x"), "--quiet"])
    assert_error(rc, capsys.readouterr().err, f"--root {afile / 'x'}: {afile} is a file, not a folder")
    assert "generating" not in caplog.text
    assert_usage_error(lambda: synthetic_tool.main(["--log-level", "FOO"]), capsys, "--log-level", "'FOO'")
    for bad in (",", "100,x"):
        assert_usage_error(lambda: synthetic_tool.main(["--extra-lengths", bad]), capsys, "--extra-lengths")
    assert synthetic_tool.build_parser().parse_args(["--log-level", "debug"]).log_level == "DEBUG"


# ============================================================================ tools/make_tiny_pretrained.py
def test_make_tiny_pretrained_bad_out_and_seed(tiny_tool, afile, tmp_path, capsys):
    assert_usage_error(lambda: tiny_tool.main(["--out", str(afile)]), capsys, "exists and is not a folder")
    assert_usage_error(lambda: tiny_tool.main(["--out", str(afile / "x")]), capsys, "is a file, not a folder")
    assert_usage_error(lambda: tiny_tool.main(["--out", str(tmp_path / "t"), "--seed", "-1"]), capsys,
                       "--seed -1: must be >= 0")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("text, needle", [
    ("auto_prepare = 5\n", "'auto_prepare' must be a dict, got int 5"),
    ("auto_prepare = dict(tiny_pretrained=dict(image_size='x'))\n",
     "auto_prepare.tiny_pretrained.image_size = 'x': expected an integer"),
    ("auto_prepare = dict(tiny_pretrained=dict(arch='gpt9'))\n", "auto_prepare.tiny_pretrained.arch = 'gpt9'"),
    ("auto_prepare = dict(\n  x=1\ny = (\n", "syntax error at line 2"),
])
def test_make_tiny_pretrained_bad_config_names_file_and_key(tiny_tool, tmp_path, capsys, text, needle):
    cfg = config_file(tmp_path, "cfg.py", text)
    assert_usage_error(lambda: tiny_tool.main(["--out", str(tmp_path / "t"), "--config", cfg]), capsys,
                       f"{cfg}: {needle}")
    assert not (tmp_path / "t").exists()


# ============================================================================ configs: train.py, convert_to_hf.py
BAD_CONFIGS = [  # (file name, text, what the error says)
    ("syntax.py", "model = dict(\n  a=1\nx = (\n", "syntax error at line 2 ('a=1')"),
    ("junk.json", '{"a": 1, }\n', "not a readable Python config (JSONDecodeError: Expecting property name"),
    ("nomodel.py", "x = 1\n", "missing key 'model'"),
]


@pytest.mark.parametrize("name, text, needle", BAD_CONFIGS)
def test_bad_config_files_are_named(train_tool, tmp_path, capsys, name, text, needle):
    cfg = config_file(tmp_path, name, text)
    rc = run_reporting_user_errors(train_tool.main, [cfg, "--work-dir", str(tmp_path / "w")])
    assert_error(rc, capsys.readouterr().err, f"{cfg}: {needle}")
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"model.mlp1.1.weight": torch.ones(2)}}, pth)
    rc = run_reporting_user_errors(conv.main, [cfg, str(pth), "--save-path", str(tmp_path / "hf")])
    assert_error(rc, capsys.readouterr().err, f"{cfg}: {needle}")
    assert not (tmp_path / "w").exists() and not (tmp_path / "hf").exists()


def test_train_config_without_optim_wrapper_or_with_a_bad_model_entry(train_tool, tmp_path, capsys):
    cfg = config_file(tmp_path, "noopt.py", "model = dict(type='x')\n")
    rc = run_reporting_user_errors(train_tool.main, [cfg, "--work-dir", str(tmp_path / "w")])
    assert_error(rc, capsys.readouterr().err, f"{cfg}: missing key 'optim_wrapper'")
    for option, needle in (("model=5", "'model' must be a dict, got int 5"),
                           ("model.nonexistent_key=3", "the model (SaSaSa2VAModel) does not take 'nonexistent_key'")):
        rc = run_reporting_user_errors(train_tool.main, [TINY_CONFIG, "--work-dir", str(tmp_path / "w"),
                                                         "--cfg-options", option])
        assert_error(rc, capsys.readouterr().err, f"{TINY_CONFIG}: {needle}")
    assert not (tmp_path / "w").exists()


def test_train_entry_point_reports_a_config_syntax_error(tmp_path):
    """The real entry (``python tools/train.py``), not only main()."""
    cfg = config_file(tmp_path, "syntax.py", BAD_CONFIGS[0][1])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), cfg, "--work-dir",
                        str(tmp_path / "w")], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert_error(r.returncode, r.stderr, f"{cfg}: syntax error at line 2")


def test_convert_cfg_option_the_model_does_not_take(tmp_path, capsys):
    pth = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"model.mlp1.1.weight": torch.ones(2)}}, pth)
    rc = run_reporting_user_errors(conv.main, ["sasasa2va_tiny", str(pth), "--save-path", str(tmp_path / "hf"),
                                               "--cfg-options", "model.nonexistent_key=3"])
    assert_error(rc, capsys.readouterr().err, f"{TINY_CONFIG}: the model (SaSaSa2VAModel) does not take "
                                              f"'nonexistent_key'")


# ============================================================================ convert_to_hf.py checkpoints
def test_convert_checkpoint_usage_errors(capsys):
    assert_usage_error(lambda: conv.main(["sasasa2va_tiny"]), capsys, "no checkpoint given: pass --pth-model PTH")
    assert_usage_error(lambda: conv.main(["sasasa2va_tiny", "a.pth", "--pth-model", "b.pth"]), capsys,
                       "two different checkpoints given: a.pth and --pth-model b.pth")


def test_convert_names_a_tensor_of_the_wrong_shape(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    monkeypatch.setattr(conv, "build_training_model", lambda config, cfg_options=None: (model, {}))
    pth = tmp_path / "other.pth"
    torch.save({"state_dict": {"0.weight": torch.ones(5, 4), "0.bias": torch.ones(3)}}, pth)
    with pytest.raises(ValueError, match=r"other.pth: tensor 0.weight has shape \(5, 4\) in the checkpoint but "
                                         r"\(3, 4\) in the model built from cfg.py: a checkpoint of another config"):
        conv.convert("cfg.py", str(pth), str(tmp_path / "hf"), log=lambda *a: None)
    conv.check_shapes({"0.bias": torch.ones(3), "extra": torch.ones(7)}, model, "ok.pth", "cfg.py")  # shapes fit


# ============================================================================ ref_vos_eval.py
@pytest.fixture
def junk_export(tmp_path):
    """A model folder whose config.json is fine and whose model.safetensors is not a safetensors file."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "sasasa2va_chat"}')
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    return hf


@pytest.mark.parametrize("args, needle", [
    (["--device", "foo"], "--device foo: expected cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--launcher", "pytorch"], "--launcher pytorch needs the RANK environment variable"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1, got -5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    (["--dist-timeout", "-5"], "--dist-timeout must be > 0"),
    (["--blind-expression", " "], "--blind-expression: empty text"),
    (["--average-threshold", "0.3"], "--average-threshold thresholds the averaged probabilities: add --average"),
    ([], "model.safetensors: not a readable safetensors file (Error while deserializing header"),
])
def test_ref_vos_eval_bad_options_before_the_model(junk_export, tmp_path, capsys, monkeypatch, args, needle):
    from projects.sasasa2va.evaluation import ref_vos_eval

    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    rc = ref_vos_eval.main([str(junk_export), "--work-dir", str(out), "--no-progress", *args])
    assert_error(rc, capsys.readouterr().err, needle)
    assert not out.exists()  # nothing claimed


def test_ref_vos_eval_empty_lists_and_threshold_with_average(capsys):
    from projects.sasasa2va.evaluation import ref_vos_eval
    from projects.sasasa2va.evaluation.runner import EvalOptions, run_evaluation

    for flag in ("--videos", "--average-members"):
        assert_usage_error(lambda: ref_vos_eval.main(["hf", flag, ","]), capsys, flag, "empty list")
    with pytest.raises(ValueError, match="--videos: no video id given"):
        run_evaluation(EvalOptions(hf_dir="hf", videos=[]))
    p = ref_vos_eval.build_parser()
    opts = ref_vos_eval.options_from_args(p.parse_args(["hf", "--mode", "all", "--average",
                                                        "--average-threshold", "0.4"]))
    assert opts.average_threshold == 0.4
    assert ref_vos_eval.options_from_args(p.parse_args(["hf", "--mode", "all", "--average"])).average_threshold == 0.5


def test_pretrain_tiny_config_errors_name_the_file(tmp_path, capsys):
    """tools/pretrain_tiny.py loads its config like train.py: a syntax error, or a model without the
    pretrained_pth the stand-in pretraining writes, end as `error: <config>: ...` before any work."""
    pretrain = _tool("pretrain_tiny")
    broken = tmp_path / "broken.py"
    broken.write_text("x = (\n")
    assert_error(pretrain.main([str(broken)]), capsys.readouterr().err, f"{broken}: syntax error at line 1")
    assert_error(pretrain.main([TINY_CONFIG, "--cfg-options", "model.pretrained_pth=None"]),
                 capsys.readouterr().err, "model.pretrained_pth is not set")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main([TINY_CONFIG, "--threads", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --threads: expected an integer >= 1, got 0" in err


def test_benchmark_train_refuses_a_bad_device(capsys):
    bench = _tool("benchmark_train")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "foo"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device foo: expected cpu, cuda or cuda:N" in err and "Traceback" not in err
