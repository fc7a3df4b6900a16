"""Shared CLI checks (projects/sasasa2va/utils/cli.py): what a bad option value is told before any work."""
import pytest
import torch

from projects.sasasa2va.utils.cli import device_problem, output_file_problem, run_reporting_user_errors


@pytest.mark.parametrize("device", [None, "auto", "cpu"])
def test_device_problem_accepts_the_cpu_and_auto(device):
    assert device_problem(device) is None


def test_device_problem_names_the_flag_and_what_is_expected(monkeypatch):
    assert device_problem("foo") == "--device foo: expected cpu, cuda or cuda:N"
    assert "not supported" in device_problem("meta", flag="--dev")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_problem("cuda") == "--device cuda: no CUDA device on this machine; use --device cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda") is None and device_problem("cuda:1") is None
    assert device_problem("cuda:2") == "--device cuda:2: this machine has 2 CUDA device(s) (cuda:0 .. cuda:1)"


def test_output_file_problem(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert output_file_problem(str(tmp_path / "new" / "deeper" / "out.json"), "--out") is None
    assert output_file_problem(str(tmp_path), "--out") == f"--out {tmp_path}: is a folder; give a file path"
    assert output_file_problem(str(afile / "out.json"), "--out") == \
        f"--out {afile / 'out.json'}: {afile} is a file, not a folder"


def test_run_reporting_user_errors(capsys, monkeypatch):
    def bad(kind):
        raise kind("x.json: key 'a': expected a list")

    assert run_reporting_user_errors(bad, ValueError) == 2
    assert capsys.readouterr().err.startswith("error: x.json: key 'a': expected a list\n")
    assert run_reporting_user_errors(bad, FileNotFoundError) == 2 and run_reporting_user_errors(lambda: None) == 0
    with pytest.raises(KeyError):  # not a bad input: a bug, with its traceback
        run_reporting_user_errors(bad, KeyError)
    monkeypatch.setenv("SASASA2VA_TRACEBACK", "1")
    with pytest.raises(ValueError):
        run_reporting_user_errors(bad, ValueError)
