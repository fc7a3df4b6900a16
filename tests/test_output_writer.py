"""The evaluation's background writer: order, bounded queue, errors, draining; and the runner on top of it
(a failed write leaves no done-marker, and a rerun completes the run to the same bytes)."""
import os
import threading
import time

import numpy as np
import pytest

from projects.sasasa2va.evaluation import averaging, predictions, runner
from projects.sasasa2va.evaluation.output_writer import BackgroundWriter
from test_eval_runner import failing, fake_env, read_bytes, run_inproc, split, syn_root  # noqa: F401


def test_jobs_run_in_order_on_one_other_thread():
    seen = []
    with BackgroundWriter(max_pending=2) as w:
        for i in range(20):
            w.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        w.wait_idle()
        assert [i for i, _ in seen] == list(range(20))
        names = {n for _, n in seen}
        assert len(names) == 1 and names != {threading.current_thread().name}
    assert w.jobs == 20
    with pytest.raises(RuntimeError, match="after close"):
        w.submit(lambda: None)


def test_the_closing_thread_helps_drain_the_queue():
    """One writer thread busy with a job that waits for the next one: only a second runner (the thread
    calling close) can start that next job."""
    started, seen = threading.Event(), {}

    def first():
        seen["first"] = threading.current_thread().name, started.wait(10)

    def second():
        seen["second"] = threading.current_thread().name
        started.set()

    w = BackgroundWriter(max_pending=4, threads=1)
    w.submit(first)
    w.submit(second)
    w.close()
    (first_thread, waited), second_thread = seen["first"], seen["second"]
    assert waited and first_thread != second_thread  # waited: the first job saw the second run, no timeout
    assert threading.current_thread().name in (first_thread, second_thread)


def _start_until_first_return(producer, returned: list) -> threading.Thread:
    """Start ``producer`` on a thread; return once it has appended to ``returned`` and had time to block."""
    t = threading.Thread(target=producer)
    t.start()
    for _ in range(1000):
        if returned:
            break
        time.sleep(0.01)
    time.sleep(0.2)
    return t


def test_submit_blocks_while_max_pending_jobs_wait():
    gate, returned = threading.Event(), []
    w = BackgroundWriter(max_pending=2)

    def producer():
        w.submit(gate.wait)  # occupies the writer until the gate opens
        for i in range(3):
            w.submit(lambda: None)
            returned.append(i)

    t = _start_until_first_return(producer, returned)
    assert t.is_alive() and returned == [0]  # 2 pending (the blocked job + one), the third submit waits
    gate.set()
    t.join(timeout=10)
    assert not t.is_alive() and returned == [0, 1, 2]
    assert w.wait_seconds > 0  # the producer's wait for room is counted ...
    w.close()
    roomy = BackgroundWriter(max_pending=8)  # ... and a submit that found room adds nothing
    for _ in range(3):
        roomy.submit(lambda: None)
    roomy.close()
    assert roomy.wait_seconds == 0.0 and roomy.jobs == 3


def test_submit_sized_waits_for_room_in_bytes():
    gate, returned = threading.Event(), []
    w = BackgroundWriter(max_pending=100, max_pending_bytes=10)

    def producer():
        w.submit_sized(6, gate.wait)  # holds 6 bytes until the gate opens
        w.submit_sized(4, lambda: None)  # fits: 10 bytes pending
        returned.append("fits")
        w.submit_sized(1, lambda: None)  # 11 > 10: waits for the first job
        returned.append("waited")

    t = _start_until_first_return(producer, returned)
    assert t.is_alive() and returned == ["fits"]
    gate.set()
    t.join(timeout=10)
    assert not t.is_alive() and returned == ["fits", "waited"]
    w.submit_sized(50, lambda: returned.append("alone"))  # larger than the bound: runs once nothing waits
    w.close()
    assert returned[-1] == "alone"
    with pytest.raises(ValueError, match="max_pending_bytes"):
        BackgroundWriter(max_pending_bytes=-1)


def test_first_error_is_raised_later_jobs_still_run():
    ran, gate = [], threading.Event()

    def boom():
        gate.wait(10)  # still running when the next job is queued
        raise OSError("disk full")

    w = BackgroundWriter()
    w.submit(boom)
    w.submit(lambda: ran.append(1))
    gate.set()
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert ran == [1]

    w = BackgroundWriter()
    w.submit(boom)
    gate.set()
    w.wait_idle()  # the failed job has finished: every later submit reports it
    for _ in range(2):
        with pytest.raises(OSError, match="disk full"):
            w.submit(lambda: None)
    with pytest.raises(OSError, match="disk full"):
        w.close()


def test_exit_on_error_drains_and_keeps_the_original_exception():
    gate, ran = threading.Event(), []
    with pytest.raises(KeyError, match="original"):
        with BackgroundWriter() as w:
            w.submit(gate.wait)
            w.submit(lambda: ran.append("queued"))
            gate.set()
            raise KeyError("original")
    assert ran == ["queued"]


def test_several_writer_threads_run_jobs_concurrently():
    """threads=3: three jobs that each wait for the other two all finish (one thread would break the
    barrier); each job still runs start to end on one thread."""
    barrier, seen = threading.Barrier(3, timeout=10), []

    def job(i):
        barrier.wait()
        seen.append((i, threading.current_thread().name))

    with BackgroundWriter(max_pending=3, threads=3) as w:
        for i in range(3):
            w.submit(job, i)
    assert sorted(i for i, _ in seen) == [0, 1, 2] and len({n for _, n in seen}) == 3
    with pytest.raises(threading.BrokenBarrierError):
        barrier = threading.Barrier(2, timeout=0.5)
        w = BackgroundWriter(max_pending=2, threads=1)
        w.submit(barrier.wait)
        w.submit(barrier.wait)
        w.wait_idle()  # one writer thread: the jobs ran one after the other, the barrier broke
        w.close()
    with pytest.raises(ValueError, match="threads"):
        BackgroundWriter(threads=-1)


def test_writer_threads_follow_the_cores_per_process():
    from projects.sasasa2va.evaluation.output_writer import WRITER_THREADS_MAX, writer_threads

    assert [writer_threads(c) for c in (1, 2, 3, 7, 8, 12, 16, 64)] == [1, 1, 1, 1, 2, 3, 4, WRITER_THREADS_MAX]
    assert writer_threads(16, local_processes=8) == 1 and writer_threads(64, local_processes=4) == 4
    assert writer_threads() >= 1


def test_writer_pending_bytes_follow_the_available_memory(tmp_path):
    """A quarter of the available memory per local process, within [512 MB, 16 GB]; MemAvailable lowered to
    what a cgroup v2 limit leaves; unreadable: the least."""
    from projects.sasasa2va.evaluation.output_writer import (
        WRITER_PENDING_BYTES, WRITER_PENDING_BYTES_MAX, available_memory_bytes, writer_pending_bytes)

    gib = 1 << 30
    assert writer_pending_bytes(1, available=32 * gib) == 8 * gib
    assert writer_pending_bytes(4, available=32 * gib) == 2 * gib
    assert writer_pending_bytes(1, available=1 * gib) == WRITER_PENDING_BYTES  # the floor
    assert writer_pending_bytes(1, available=1024 * gib) == WRITER_PENDING_BYTES_MAX
    assert WRITER_PENDING_BYTES <= writer_pending_bytes() <= WRITER_PENDING_BYTES_MAX  # this machine's
    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n")
    assert available_memory_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024  # no cgroup files
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_memory_bytes(str(meminfo), str(cgroup)) == 20000000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{8 * gib}\n")
    (cgroup / "memory.current").write_text(f"{3 * gib}\n")
    assert available_memory_bytes(str(meminfo), str(cgroup)) == 5 * gib  # the container's limit is lower
    assert available_memory_bytes(str(tmp_path / "none"), str(cgroup)) == 5 * gib
    assert available_memory_bytes(str(tmp_path / "none"), str(tmp_path / "none")) is None
    meminfo.write_text("MemAvailable: lots\n")
    assert available_memory_bytes(str(meminfo), str(tmp_path / "none")) is None


def test_runner_queues_up_to_writer_pending_bytes(syn_root, fake_env, tmp_path, monkeypatch):
    """The evaluation's writer gets the bound of writer_pending_bytes (for its local processes), or the
    override runner.WRITER_PENDING_BYTES."""
    seen = []

    class Recording(runner.BackgroundWriter):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("max_pending_bytes"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runner, "BackgroundWriter", Recording)
    monkeypatch.setattr(runner, "writer_pending_bytes", lambda local: 777 * local)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert run_inproc(syn_root, tmp_path / "a", "--mode", "uniform") == 0
    monkeypatch.setattr(runner, "WRITER_PENDING_BYTES", 4096)
    assert run_inproc(syn_root, tmp_path / "b", "--mode", "uniform") == 0
    assert seen == [1554, 4096]


def test_runner_output_identical_with_several_writer_threads(syn_root, fake_env, tmp_path, monkeypatch):
    args = ("--mode", "uniform,q_frame", "--average")
    one = tmp_path / "one"
    monkeypatch.setattr(runner, "writer_threads", lambda **kw: 1)
    assert run_inproc(syn_root, one, *args) == 0
    several = tmp_path / "several"
    monkeypatch.setattr(runner, "writer_threads", lambda **kw: 3)
    assert run_inproc(syn_root, several, *args) == 0
    files = sorted(os.path.relpath(os.path.join(d, f), one) for d, _, fs in os.walk(one) for f in fs
                   if f.endswith((".npz", ".json")) and "eval_summary" not in f)
    assert any(f.endswith(".npz") for f in files) and any(os.sep + "preds" + os.sep in f for f in files)
    for f in files:
        if os.path.basename(f) == "results.json":
            a, b = runner_results(one / f), runner_results(several / f)
            assert a == b, f
        elif f.endswith(".npz"):
            assert np.array_equal(np.load(one / f)["probs"], np.load(several / f)["probs"]), f
        elif f.startswith("average" + os.sep):  # averaged ahead: tagged with each run's own id
            a, b = runner_results(one / f), runner_results(several / f)
            assert a.pop("average_ahead")["run"] != b.pop("average_ahead")["run"] and a == b, f
        else:
            assert read_bytes(one / f) == read_bytes(several / f), f


def runner_results(path):
    import json

    with open(path, "r", encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        data.pop("__meta__", None)
    return data


def test_inline_mode_and_bad_arguments():
    out = []
    w = BackgroundWriter(threads=0)
    w.submit(out.append, threading.current_thread().name)
    w.close()
    assert out == [threading.current_thread().name]
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter(max_pending=0)


def test_save_probs_roundtrip_is_a_plain_npz(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random((3, 17, 29)).astype(np.float32)
    path = averaging.save_probs(str(tmp_path), "v", "e", p)
    with np.load(path) as z:
        assert z.files == ["probs"]
        np.testing.assert_array_equal(z["probs"], averaging.quantize_probs(p))
    np.testing.assert_array_equal(averaging.load_probs(str(tmp_path), "v", "e"), averaging.quantize_probs(p))


def test_failed_write_leaves_no_marker_and_a_rerun_completes(syn_root, fake_env, tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_inproc(syn_root, full) == 0
    real, calls = runner.save_probs, []

    def flaky(run_dir, video_id, exp_id, probs, encoded=None):
        calls.append((video_id, exp_id))
        if len(calls) == 4:
            raise OSError(f"no space left writing {video_id}/{exp_id}")
        return real(run_dir, video_id, exp_id, probs, encoded)

    monkeypatch.setattr(runner, "save_probs", flaky)
    assert run_inproc(syn_root, part) == 2  # the command line reports the failed write and stops
    assert "error: no space left writing" in capsys.readouterr().err
    monkeypatch.setattr(runner, "save_probs", real)
    vid, exp = calls[3]
    assert not os.path.exists(runner.preds_path(str(part), vid, exp))  # no done-marker without its data
    for v, e in calls[:3]:  # written before the failure: kept
        assert os.path.isfile(runner.preds_path(str(part), v, e))
    assert run_inproc(syn_root, part) == 0
    assert read_bytes(part / "results.json") == read_bytes(full / "results.json")


# ============================================================================ outputs shared by several modes
def test_encode_once_per_live_read_only_array_across_threads():
    from projects.sasasa2va.evaluation import shared_encodings as se

    calls, gate = [], threading.Event()

    def slow(a):
        calls.append(1)
        gate.wait(5)
        return a.sum()

    shared = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    shared.flags.writeable = False
    got = []
    threads = [threading.Thread(target=lambda: got.append(se.encode_once("t", shared, slow))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert got == [66] * 4 and len(calls) == 1
    assert se.encode_once("other kind", shared, slow) == 66 and len(calls) == 2
    writable = shared.copy()
    assert se.encode_once("t", writable, slow) == se.encode_once("t", writable, slow) and len(calls) == 4
    before = se.cached_count()
    del shared, got
    assert se.cached_count() == before - 2  # the array's two encodings went with it


def test_encode_once_does_not_keep_a_failure():
    from projects.sasasa2va.evaluation import shared_encodings as se

    a = np.zeros((1, 2, 2), np.uint8)
    a.flags.writeable = False
    attempts = []

    def flaky(x):
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("transient")
        return "ok"

    with pytest.raises(OSError, match="transient"):
        se.encode_once("f", a, flaky)
    assert se.encode_once("f", a, flaky) == "ok" and se.encode_once("f", a, flaky) == "ok" and len(attempts) == 2


def test_store_output_encodes_shared_outputs_once(tmp_path, monkeypatch):
    """Two modes handed the same read-only arrays: one deflate and one RLE pass, the same bytes stored."""
    from projects.sasasa2va.evaluation import results_io

    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (3, 8, 10), dtype=np.uint8)
    masks = probs > 127
    counts = {"npz": 0, "rle": 0}

    def counted(name, fn):
        def wrapper(x):
            counts[name] += 1
            return fn(x)
        return wrapper

    monkeypatch.setattr(runner, "encode_probs", counted("npz", averaging.encode_probs))
    monkeypatch.setattr(runner, "encode_masks", counted("rle", results_io.encode_masks))
    task = predictions.ExpressionTask(index=0, video_id="v", exp_id="0", text="x", prompt="<image>\nx")
    frames = ["00000", "00001", "00002"]

    def store(run_dir, m, p):
        out = predictions.ExpressionOutput("ok", "Sure [SEG]", m, p, 1)
        runner._store_output(str(tmp_path / run_dir), task, frames, out, p, (8, 10))

    store("writable_a", masks, probs)
    store("writable_b", masks, probs)
    assert counts == {"npz": 2, "rle": 2}
    for a in (masks, probs):
        a.flags.writeable = False
    store("shared_a", masks, probs)
    store("shared_b", masks, probs)
    assert counts == {"npz": 3, "rle": 3}
    stored = {d: (read_bytes(averaging.probs_path(str(tmp_path / d), "v", "0")),
                  read_bytes(runner.preds_path(str(tmp_path / d), "v", "0")))
              for d in ("writable_a", "writable_b", "shared_a", "shared_b")}
    assert len(set(stored.values())) == 1
    assert np.array_equal(averaging.load_probs(str(tmp_path / "shared_b"), "v", "0"), probs)


def test_a_finished_job_releases_its_arrays_while_the_writer_waits():
    import gc
    import weakref

    w = BackgroundWriter(threads=1)
    a = np.zeros(1000)
    ref = weakref.ref(a)
    w.submit_sized(a.nbytes, lambda x: x.sum(), a)
    w.wait_idle()
    del a
    gc.collect()
    time.sleep(0.05)
    assert ref() is None  # the idle writer thread holds no reference to the last job's arguments
    w.close()
