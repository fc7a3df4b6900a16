"""Training interruption (issue 7 item 2): kill -9 of the whole launcher process group at a random point
after the first checkpoint, then ``--resume auto``.

``bash tools/dist.sh train <tiny config> 1`` runs torchrun, which starts the trainer in its own session;
tools/train.py arms PR_SET_PDEATHSIG so the trainer dies with the launcher (checked here: no process of
the killed run survives). The rerun continues from the latest complete checkpoint, and, with the base
config's RNGStateHook, a resumed CPU run reproduces an uninterrupted run bit for bit (slow test).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from projects.sasasa2va.datasets.synthetic import generate_all
from projects.sasasa2va.models.tiny import make_tiny_for_config
from projects.sasasa2va.utils.checkpoint import load_mmengine_checkpoint

from test_training import RUN_OPTIONS, SMALL_DATA, TINY_CONFIG, iter_lines, run_dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "tools", "dist.sh")
MAX_ITERS = 8
OPTIONS = [*RUN_OPTIONS, f"train_cfg.max_iters={MAX_ITERS}", "default_hooks.checkpoint.interval=2"]


def _train_tool():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import train as train_tool
    finally:
        sys.path.pop(0)
    return train_tool


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Start a run, SIGKILL its process group at a random moment after the first checkpoint -- within a
    random iteration between 3 and MAX_ITERS - 3 (read off the run's log, so a fast machine cannot finish
    the run first), possibly while a checkpoint is being written -- and rerun with --resume auto.
    Returns what the tests check."""
    root = tmp_path_factory.mktemp("kill_root")
    generate_all(str(root / "data" / "synthetic"), seed=0, **SMALL_DATA)
    make_tiny_for_config(str(root / "pretrained" / "tiny"), TINY_CONFIG)
    wd = root / "wd_kill"
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    log_path = root / "killed.log"
    cmd = ["bash", DIST, "train", TINY_CONFIG, "1", "--work-dir", "wd_kill", "--seed", "0", "--cfg-options",
           *OPTIONS]
    rng = random.Random(os.urandom(8))
    target, delay = rng.randint(3, MAX_ITERS - 3), rng.uniform(0.0, 0.2)
    print(f"kill {delay:.2f} s after iteration {target} is logged")
    train_tool = _train_tool()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            workers = sorted(set(workers) | set(_children(proc.pid)))
            if (wd / "last_checkpoint").is_file() and train_tool.latest_complete_checkpoint(str(wd)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "run ended before its first checkpoint:\n" + log_path.read_text()[-3000:]
        while time.time() < deadline and proc.poll() is None:
            if any(int(i) >= target for i, *_ in iter_lines(log_path.read_text())):
                break
            time.sleep(0.02)
        time.sleep(delay)
        workers = sorted(set(workers) | set(_children(proc.pid)))
        assert proc.poll() is None, "run finished before it could be killed (raise MAX_ITERS)"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for w in workers:  # never leave a trainer behind, even when the test fails
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    killed_log = log_path.read_text()
    before = sorted(os.listdir(wd))
    resume_from = train_tool.latest_complete_checkpoint(str(wd))
    k = int(os.path.basename(resume_from)[5:-4])
    out = run_dist(root, 1, "--resume", "auto", "--work-dir", "wd_kill", "--cfg-options", *OPTIONS)
    return dict(root=root, wd=wd, k=k, out=out, killed_log=killed_log, workers=workers, survivors=survivors,
                before=before, delay=delay)


def test_kill9_then_resume_auto_continues_from_the_checkpoint(killed_run):
    r = killed_run
    assert r["workers"], "no trainer process seen under torchrun"
    assert r["survivors"] == [], f"trainer processes {r['survivors']} survived kill -9 of the launcher group"
    killed_iters = [int(i) for i, *_ in iter_lines(r["killed_log"])]
    assert 2 <= r["k"] < MAX_ITERS and r["k"] % 2 == 0, (r["k"], r["before"])
    assert killed_iters and killed_iters[-1] < MAX_ITERS and r["k"] <= killed_iters[-1]
    lines = iter_lines(r["out"])
    assert [int(i) for i, *_ in lines] == list(range(r["k"] + 1, MAX_ITERS + 1)), r["out"][-3000:]
    assert all(int(n) == MAX_ITERS for _, n, *_ in lines)
    assert f"resumed epoch: 0, iter: {r['k']}" in r["out"]
    assert f"Advance dataloader {r['k']} steps" in r["out"]
    final = r["wd"] / f"iter_{MAX_ITERS}.pth"
    assert (r["wd"] / "last_checkpoint").read_text().strip().endswith(f"iter_{MAX_ITERS}.pth")
    ckpt = load_mmengine_checkpoint(str(final))  # weights_only=True + the explicit allow-list
    assert ckpt["meta"]["iter"] == MAX_ITERS and ckpt["meta"]["seed"] == 0 and "rng_state" in ckpt


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_run(killed_run):
    """CPU training is deterministic (two uninterrupted runs give identical tensors), and the RNG states
    stored by RNGStateHook make the resumed run identical too. Without the hook, the final tensors differ
    (about 1e-3 after 4 resumed iterations) because mmengine re-seeds on resume."""
    r = killed_run
    out = run_dist(r["root"], 1, "--work-dir", "wd_ref", "--seed", "0", "--cfg-options", *OPTIONS)
    ref = load_mmengine_checkpoint(str(r["root"] / "wd_ref" / f"iter_{MAX_ITERS}.pth"))
    got = load_mmengine_checkpoint(str(r["wd"] / f"iter_{MAX_ITERS}.pth"))
    assert list(ref["state_dict"]) == list(got["state_dict"])
    diff = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], got["state_dict"][k])]
    assert diff == [], f"{len(diff)} tensors differ, e.g. {diff[:3]}"
    for p, st in ref["optimizer"]["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, got["optimizer"]["state"][p][name]), (p, name)
    # the logged losses of the resumed iterations equal the reference's
    ref_lines = {int(i): loss for i, _, _, _, loss in iter_lines(out)}
    for i, _, _, _, loss in iter_lines(r["out"]):
        assert ref_lines[int(i)] == loss, i


def test_resume_auto_skips_a_half_written_checkpoint(tmp_path):
    """kill -9 during torch.save leaves a truncated iter_<n>.pth (and possibly an empty last_checkpoint):
    --resume auto then takes the newest complete checkpoint."""
    train_tool = _train_tool()
    wd = tmp_path / "wd"
    wd.mkdir()
    assert train_tool.latest_complete_checkpoint(str(wd)) is None
    torch.save({"meta": {"iter": 2}}, wd / "iter_2.pth")
    torch.save({"meta": {"iter": 4}}, wd / "iter_4.pth")
    data = (wd / "iter_4.pth").read_bytes()
    (wd / "iter_6.pth").write_bytes(data[: len(data) // 2])  # cut short
    (wd / "last_checkpoint").write_text(str(wd / "iter_4.pth"))
    assert train_tool.latest_complete_checkpoint(str(wd)) == str(wd / "iter_4.pth")
    (wd / "last_checkpoint").write_text(str(wd / "iter_6.pth"))  # named, but incomplete
    assert train_tool.latest_complete_checkpoint(str(wd)) == str(wd / "iter_4.pth")
    (wd / "last_checkpoint").write_text("")  # killed while writing the marker
    assert train_tool.latest_complete_checkpoint(str(wd)) == str(wd / "iter_4.pth")
    (wd / "iter_4.pth").unlink()  # removed by max_keep_ckpts before iter_6 was written
    (wd / "last_checkpoint").write_text(str(wd / "iter_4.pth"))
    assert train_tool.latest_complete_checkpoint(str(wd)) == str(wd / "iter_2.pth")
    assert train_tool.resolve_resume("auto", str(wd)) == str(wd / "iter_2.pth")
    with pytest.raises(FileNotFoundError):
        train_tool.resolve_resume(str(wd / "nope.pth"), str(wd))


class _SavingRunner:
    """What CheckpointHook uses of a Runner; records the folder while each save runs, can fail a save."""

    def __init__(self, work_dir: str, name: str):
        from mmengine.logging import MessageHub, MMLogger

        self.work_dir = work_dir
        self.message_hub = MessageHub.get_instance(name)
        self.logger = MMLogger.get_instance(name)
        self.seen_during_save: list[list[str]] = []
        self.fail = False

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        self.seen_during_save.append(sorted(n for n in os.listdir(out_dir) if n.endswith(".pth")))
        if self.fail:
            raise OSError("No space left on device")
        torch.save({"meta": {}}, os.path.join(out_dir, filename))


@pytest.mark.parametrize("keep", [1, 2])
def test_safe_checkpoint_hook_removes_old_checkpoints_after_the_save(tmp_path, keep):
    """The base config's SafeCheckpointHook keeps ``max_keep_ckpts`` checkpoints, removing the oldest only
    once the new one is saved (mmengine's CheckpointHook removes it first: with one kept, a kill during the
    save leaves none); a failed save removes nothing; the saved message hub lists what is kept."""
    from mmengine.hooks import CheckpointHook

    from projects.sasasa2va.utils.checkpoint import SafeCheckpointHook

    def saves(hook_cls, folder, steps, fail_last=False):
        folder.mkdir()
        runner = _SavingRunner(str(folder), f"safe_ckpt_{hook_cls.__name__}_{keep}_{fail_last}")
        hook = hook_cls(interval=2, by_epoch=False, max_keep_ckpts=keep)
        hook.before_train(runner)
        for i, step in enumerate(steps):
            runner.fail = fail_last and i == len(steps) - 1
            with pytest.raises(OSError) if runner.fail else contextlib.nullcontext():
                hook._save_checkpoint_with_step(runner, step, {"iter": step})
        return runner

    runner = saves(SafeCheckpointHook, tmp_path / "safe", [2, 4, 6])
    kept = [f"iter_{s}.pth" for s in (2, 4, 6)][-keep:]
    assert sorted(n for n in os.listdir(tmp_path / "safe") if n.endswith(".pth")) == kept
    assert runner.seen_during_save[-1] == sorted([f"iter_{s}.pth" for s in (2, 4)][-keep:])  # the old still there
    assert runner.message_hub.get_info("keep_ckpt_ids") == [2, 4, 6][-keep:]
    # mmengine's own hook removed the oldest before saving (what the subclass is for)
    base = saves(CheckpointHook, tmp_path / "base", [2, 4, 6])
    assert len(base.seen_during_save[-1]) == keep - 1
    # a save that fails (disk full, kill) removes nothing
    failed = saves(SafeCheckpointHook, tmp_path / "failed", [2, 4, 6], fail_last=True)
    assert failed.seen_during_save[-1] == sorted(n for n in os.listdir(tmp_path / "failed") if n.endswith(".pth"))
    assert [f"iter_{s}.pth" for s in (2, 4)][-keep:] == sorted(
        n for n in os.listdir(tmp_path / "failed") if n.endswith(".pth"))
