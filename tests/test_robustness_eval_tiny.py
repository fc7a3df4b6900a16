"""Evaluation with the real tiny model (issue 7 items 2-3): an exported HF folder evaluated on a 2-video
synthetic split by ref_vos_eval.py in subprocesses (remote code, as a user runs it) with 1 and 2
processes (both sharding schemes), and a run killed with SIGKILL at a random point then resumed: every
results.json must be byte-identical to the uninterrupted single-process one.

The export and the scripted LM head come from tests/test_export.py / tests/test_inference.py: a random
LLM emits arbitrary text (and would generate up to 2048 tokens), so the factory below loads the folder
exactly like the runner does (``model_loading.load_model``, remote code) and then replaces only the LM head by
one that answers ten [SEG]; vision, LLM hidden states, [SEG] projection and SAM2 run for real.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "ref_vos_eval.py")
DIST_TEST = os.path.join(ROOT, "projects", "sasasa2va", "evaluation", "dist_test.sh")
FACTORY = f"{os.path.abspath(__file__)}:scripted_factory"
MODES = "uniform,q_frame"


# ================================================================================================ factory
def scripted_factory(hf_dir, device, dtype, remote_code, rank=0):
    """The runner's own loading (remote code), then the scripted LM head of tests/test_export.py."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from test_export import ANSWER_STOP, _install_script
    from test_inference import set_answer

    from projects.sasasa2va.evaluation.distributed import DistContext
    from projects.sasasa2va.evaluation.model_loading import load_model
    from projects.sasasa2va.evaluation.runner import EvalOptions

    model, tok = load_model(EvalOptions(hf_dir=hf_dir, remote_code=remote_code, dtype="float32"),
                            DistContext(device=device))
    set_answer(_install_script(model, tok), tok, 10, stop=ANSWER_STOP)
    return model, tok


# ================================================================================================ fixtures
@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """(root, hf_dir, data_root, env): a converted tiny checkpoint and a 2-video synthetic valid_u split."""
    sys.path.insert(0, TESTS)
    from test_export import export_tiny

    from projects.sasasa2va.datasets.synthetic import generate_all

    root = tmp_path_factory.mktemp("eval_tiny")
    hf_dir = export_tiny(root)
    data_root = root / "data"
    generate_all(str(data_root / "synthetic"), seed=3, num_train_videos=0, num_valid_u_videos=2,
                 num_valid_videos=0, min_frames=5, max_frames=9, sizes=((64, 48),), min_objects=2,
                 max_objects=2, formats=("mevis", "qframe"))
    env = dict(os.environ, HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=ROOT)
    env.pop("OMP_NUM_THREADS", None)
    return root, hf_dir, str(data_root), env


def _args(hf_dir, data_root, work_dir, *extra):
    return [hf_dir, "--dataset", "SYN_MEVIS_U", "--data-root", data_root, "--work-dir", str(work_dir),
            "--mode", MODES, "--model-factory", FACTORY, "--no-progress", *extra]


def _run_single(tiny_eval, work_dir, *extra, timeout=600):
    _, hf_dir, data_root, env = tiny_eval
    env = dict(env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCRIPT, *_args(hf_dir, data_root, work_dir, *extra)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _run_dist(tiny_eval, work_dir, nproc, *extra, timeout=600):
    _, hf_dir, data_root, env = tiny_eval
    env = dict(env)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["PORT"] = str(s.getsockname()[1])
    args = _args(hf_dir, data_root, work_dir, *extra)
    cmd = ["bash", DIST_TEST, SCRIPT, args[0], str(nproc), *args[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _num_preds(work_dir) -> int:
    """Finished expressions (per-expression files; temp files start with '.')."""
    return sum(len([f for f in fs if f.endswith(".json") and not f.startswith(".")])
               for m in MODES.split(",") for _, _, fs in os.walk(os.path.join(work_dir, "modes", m, "preds")))


def _results(work_dir) -> dict[str, bytes]:
    return {m: _read(os.path.join(work_dir, "modes", m, "results.json")) for m in MODES.split(",")}


@pytest.fixture(scope="module")
def reference(tiny_eval):
    root = tiny_eval[0]
    r = _run_single(tiny_eval, root / "ref")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return _results(root / "ref")


# ================================================================================================ tests
def test_tiny_model_results_are_real_and_independent_of_the_process_count(tiny_eval, reference):
    root = tiny_eval[0]
    for mode, data in reference.items():
        res = json.loads(data)
        meta = res.pop("__meta__")
        assert meta["num_videos"] == 2 and meta["failed"] == 0, meta
        entries = [e for exps in res.values() for e in exps.values()]
        assert len(entries) == meta["num_expressions"] >= 4
        assert all(e["status"] == "ok" and e["text_prediction"].count("[SEG]") == 10 for e in entries)
        # the scripted answer is the same for every expression, the masks are not (text + frames differ)
        masks = {json.dumps(e["prediction_masks"]) for e in entries}
        assert len(masks) > 1, mode
    for nproc, scheme in ((2, "video"), (2, "expression")):
        out = root / f"p{nproc}_{scheme}"
        r = _run_dist(tiny_eval, out, nproc, "--shard-by", scheme)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert f"{nproc} process(es)" in r.stdout
        assert _results(out) == reference, (nproc, scheme)


def test_tiny_model_kill9_and_resume_is_byte_identical(tiny_eval, reference):
    root, hf_dir, data_root, env = tiny_eval
    work = root / "killed"
    total = sum(len(exps) for d in reference.values() for k, exps in json.loads(d).items() if k != "__meta__")
    # a random point in the first half, so the kill surely lands before the run ends
    target = random.Random(os.urandom(8)).randint(1, total // 2)
    print(f"kill after {target} of {total} expression files")
    proc = subprocess.Popen([sys.executable, SCRIPT, *_args(hf_dir, data_root, work)], cwd=ROOT,
                            env=dict(env, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = _num_preds(work)
            if done >= target:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "evaluation finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not any(os.path.exists(work / "modes" / m / "results.json") for m in MODES.split(","))
    r = _run_single(tiny_eval, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads(_read(work / "eval_summary.json"))
    assert summary["this_run"]["skipped"] >= 1 and summary["this_run"]["processed"] >= 1
    assert summary["this_run"]["skipped"] + summary["this_run"]["processed"] == total
    assert _results(work) == reference
