"""The README's main job, shortened (few iterations, few videos), end to end through the same script."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ("--num-train-videos 3 --num-valid-u-videos 2 --num-valid-videos 2 --num-revos-videos 1 "
         "--num-rvos-videos 1 --num-sav-videos 1 --num-images 2 --max-frames 12")


def test_quickstart_short_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), "--run-root", str(tmp_path), "--iters", "3",
         "--pretrain-steps", "2", "--max-new-tokens", "48", "--synthetic-args", SMALL],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wd = tmp_path / "work_dirs" / "quickstart"
    summary = json.loads((wd / "summary.json").read_text())
    runs = ["uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus", "average", "language_blind"]
    for name in runs:
        assert set(summary[name]) == {"J", "F", "J&F"}
        assert 0.0 <= summary[name]["J&F"] <= 100.0
    assert set(summary["times_s"]) == {"data", "pretrained", "stand_in_pretraining", "train", "export", "eval_valid_u",
                                       "eval_blind", "metrics", "submission", "visualize", "total"}  # every stage ran
    kinds = summary["average_by_kind"]
    meta = json.loads((tmp_path / "data" / "synthetic" / "mevis" / "valid_u" / "meta_expressions.json").read_text())
    assert set(kinds) == {"colour", "shape", "motion-only", "plural"}
    assert sum(k["count"] for k in kinds.values()) == sum(len(v["expressions"]) for v in meta["videos"].values())
    assert all(k["J&F"] is None or 0.0 <= k["J&F"] <= 100.0 for k in kinds.values())
    assert (wd / "submission_valid.zip").is_file()
    assert (wd / "visualization" / "index.html").is_file()
    assert (wd / "eval_valid_u" / "results.json").is_file()
    marker = json.loads((tmp_path / "pretrained" / "tiny" / "stand_in_pretraining.json").read_text())
    assert marker["steps"] == 2 and marker["seg_tokens"] > 0
    # the printed table ends the job
    assert "language_blind" in proc.stdout and "stage times" in proc.stdout and "by expression kind" in proc.stdout
    assert "%|" not in proc.stdout  # no progress bar lines among the stages' echoed lines


def test_quickstart_refuses_counts_below_one(capsys):
    """0 would silently mean 'the default' (--iters, --pretrain-steps, --max-videos), be refused by
    ref_vos_eval.py (--max-new-tokens) or by dist.sh after the slow stages (--gpus): refused before any stage."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_tool", os.path.join(ROOT, "tools", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.parse_args(["--max-new-tokens", "1"]).max_new_tokens == 1
    for flag in ("--iters", "--pretrain-steps", "--gpus", "--max-videos", "--max-new-tokens"):
        for bad in ("0", "-3"):
            with pytest.raises(SystemExit) as exit_info:
                quickstart.parse_args([flag, bad])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and f"argument {flag}: expected an integer >= 1, got {bad}" in err



def test_quickstart_echoes_no_progress_bar_lines():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_tool", os.path.join(ROOT, "tools", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart._interesting("J&F 76.41 J 71.99 F 80.83")
    assert quickstart._interesting("wrote 24 GIFs and index.html")
    assert not quickstart._interesting("J&F:  25%|██▌       | 24/95 [00:00<00:01, 70.21exp/s]")
    assert not quickstart._interesting("PNGs: 100%|██████████| 4/4 [00:00<00:00] done")


def test_quickstart_threads_reach_every_stage(tmp_path, monkeypatch):
    """--threads N: every stage's process gets OMP_NUM_THREADS=N (the launchers and torch read it); without
    it the stages inherit the environment unchanged."""
    import importlib.util
    import inspect

    spec = importlib.util.spec_from_file_location("quickstart_tool", os.path.join(ROOT, "tools", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    envs = []

    class Stop(Exception):
        pass

    def first_stage_only(cmd, log_path, env=None, **kw):
        envs.append(env)
        raise Stop

    monkeypatch.setattr(quickstart, "run", first_stage_only)
    for argv in (["--threads", "3"], []):
        with pytest.raises(Stop):
            quickstart.main(["--run-root", str(tmp_path), *argv])
    assert envs == [{"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}, {}]
    body = inspect.getsource(quickstart.main)
    assert " run([" not in body and "(run([" not in body  # each stage through run_stage

@pytest.mark.slow
def test_quickstart_resume_continues_a_cut_run(tmp_path):
    """--resume: training goes on from the newest complete checkpoint (2 -> 3 iterations), the export and
    the evaluations are redone only when the checkpoint changed, and an evaluation cut short keeps its
    finished expressions -- with the scores of an uncut run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = ["--run-root", str(tmp_path), "--pretrain-steps", "2", "--max-new-tokens", "48", "--synthetic-args", SMALL]

    def quickstart(*extra):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), *common, *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        return proc.stdout

    wd = tmp_path / "work_dirs" / "quickstart"
    quickstart("--iters", "2")  # stands for a run whose training was cut after its checkpoint of iteration 2
    marker = tmp_path / "pretrained" / "tiny" / "stand_in_pretraining.json"
    marker_before = marker.read_bytes()
    out = quickstart("--iters", "3", "--resume")
    assert "tiny checkpoints and their stand-in pretraining are done" in out and marker.read_bytes() == marker_before
    assert "--resume auto: resuming from" in (wd / "logs" / "train.log").read_text()
    train = wd / "train"
    assert (train / "iter_3.pth").is_file() and not (wd / "train.previous").exists()
    record = json.loads((wd / "hf_checkpoint.json").read_text())
    assert record["checkpoint"] == str(train / "iter_3.pth")  # a new checkpoint: exported again
    first = json.loads((wd / "summary.json").read_text())
    assert first["times_s"]["export"] > 0 and first["times_s"]["pretrained"] == 0.0

    # an evaluation cut short: one video of one mode and the averaged results are gone
    u = wd / "eval_valid_u"
    video = sorted(os.listdir(u / "modes" / "q_frame" / "preds"))[0]
    removed = len(os.listdir(u / "modes" / "q_frame" / "preds" / video))
    for path in (u / "modes" / "q_frame" / "preds" / video, u / "modes" / "q_frame" / "probs" / video):
        shutil.rmtree(path)
    (u / "results.json").unlink()
    (wd / "summary.json").unlink()
    out = quickstart("--iters", "3", "--resume")
    assert "already holds" in out  # the export kept
    summary = json.loads((u / "eval_summary.json").read_text())["this_run"]
    assert summary["processed"] == removed and summary["skipped"] > 0
    second = json.loads((wd / "summary.json").read_text())
    assert second["times_s"]["export"] == 0.0
    assert (wd / "logs" / "train.log").read_text().count("--resume auto: resuming from") == 2  # (twice resumed)
    for name in ("uniform", "q_frame", "average", "language_blind"):
        assert second[name] == first[name]  # the same model, the same scores
    with pytest.raises(subprocess.CalledProcessError):  # data of other settings are refused, not replaced
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), "--run-root", str(tmp_path),
                        "--resume", "--synthetic-args", SMALL.replace("--max-frames 12", "--max-frames 14")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
