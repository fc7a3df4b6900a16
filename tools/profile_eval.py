"""Where the shared evaluation path spends its time, and what grows with the expressions per video.

    python tools/profile_eval.py --device cpu --threads 1 --frame-size 640x360 --out work_dirs/profile_eval
    python tools/profile_eval.py --preset 4b-shaped --device cuda --num-videos 1 --min-frames 20 --max-frames 20 \\
        --frame-size 640x360 --out $OUT

Runs the shared path of ``tools/benchmark_eval.py`` (same model, synthetic split and shared-path options:
its model, data-size and VideoContext arguments apply; its run-control ones -- --split-dir, --qframe-file,
--json, --repeat, --scaling-repeat, --skip-*, --no-warmup, --time-budget, --train-* -- are refused) with
E and 2E expressions per video, each under cProfile after an untimed warm-up, and
writes to ``--out``: ``profile_E<n>.txt`` (functions by own time and by cumulative time),
``profile_growth.txt`` (the functions whose cumulative time grew most from E to 2E: the per-expression
costs) and, with ``--raw``, the cProfile files ``profile_E<n>.prof`` (``python -m pstats``). The phase times of each run are
printed too. cProfile slows Python-heavy code (the greedy decoding loop most), so the absolute times run
above benchmark_eval's. On CUDA the profiled runs are not synchronised per phase (as benchmark_eval's timed
runs): the phase times come from one more run of each E, outside the profile, whose PhaseTimer synchronises
around every phase call, so GPU work is charged to the phase that launched it (``--phases-in-timed-runs``:
the profiled runs are those synchronised runs, as before 2026-11-27's ninth session). No naive path, no
training benchmark.

``--sampler MS`` replaces cProfile by a sampling profiler of the model's (main) thread: its stack every MS
milliseconds, in wall time (waits for the GPU, the GIL or a lock included), no per-call overhead. Unlike
cProfile on Python >= 3.12 (sys.monitoring: every thread's calls in one profile), it sees the main thread
alone, so the writer threads' work does not blur it. Writes ``sample_E<n>.txt`` (functions by inclusive
time, source lines by own time, and the deepest line of this project's code on the stack: where a torch or
numpy call was made) and ``sample_growth.txt``.

``--torch-profiler`` adds a third, separate run of the E split under ``torch.profiler`` (CPU and, on
CUDA, kernel activity) and writes ``torch_profile_E<n>.txt``: operators by self device time and by self
CPU time -- whether a slow operator (e.g. attention in the decoding steps) costs host time or GPU time.
"""
from __future__ import annotations

import collections
import contextlib
import cProfile
import io
import os
import pstats
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tools")):
    if path not in sys.path:
        sys.path.insert(0, path)

import benchmark_eval as be  # noqa: E402  (the benchmark's model, data and run helpers)
from projects.sasasa2va.utils.cli import output_dir_problem, positive_int, run_reporting_user_errors  # noqa: E402
from projects.sasasa2va.utils.io import atomic_write_text  # noqa: E402


def _where(key: tuple) -> str:
    """'file:line(function)' with the file relative to site-packages or the repo; line None: 'file(function)'."""
    filename, line, func = key
    for marker in ("site-packages/", ROOT + os.sep):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}({func})" if line is None else f"{filename}:{line}({func})"


def growth_lines(small: pstats.Stats, large: pstats.Stats, top: int) -> list[str]:
    """Functions ordered by the growth of their cumulative time (s) between two profiles."""
    a, b = small.stats, large.stats  # type: ignore[attr-defined]
    empty = (0, 0, 0.0, 0.0, {})
    rows = []
    for key in set(a) | set(b):
        ca, cb = a.get(key, empty)[3], b.get(key, empty)[3]
        ta, tb = a.get(key, empty)[2], b.get(key, empty)[2]
        na, nb = a.get(key, empty)[1], b.get(key, empty)[1]
        rows.append((cb - ca, tb - ta, ca, cb, na, nb, key))
    rows.sort(key=lambda r: r[0], reverse=True)
    out = [f"{'cum +s':>8} {'own +s':>8} {'cum s (E)':>10} {'cum s (2E)':>11} {'calls':>13}  function"]
    for grow, own, ca, cb, na, nb, key in rows[:top]:
        out.append(f"{grow:8.3f} {own:8.3f} {ca:10.3f} {cb:11.3f} {f'{na}->{nb}':>13}  {_where(key)}")
    return out


class StackSampler:
    """Samples one thread's Python stack every ``interval_s`` from a daemon thread (``with`` block)."""

    def __init__(self, interval_s: float, thread_id: int | None = None):
        self.interval_s = float(interval_s)
        self.thread_id = thread_id if thread_id is not None else threading.main_thread().ident
        self.samples = 0
        self.seconds = 0.0
        self.inclusive: collections.Counter = collections.Counter()
        self.own_lines: collections.Counter = collections.Counter()
        self.project_lines: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return
        self.samples += 1
        seen, first, project = set(), True, None
        while frame is not None:
            code = frame.f_code
            where = _where((code.co_filename, None, code.co_name))
            if first:
                self.own_lines[_where((code.co_filename, frame.f_lineno, code.co_name))] += 1
                first = False
            if project is None and code.co_filename.startswith(ROOT + os.sep):
                project = _where((code.co_filename, frame.f_lineno, code.co_name))
            if where not in seen:
                self.inclusive[where] += 1
                seen.add(where)
            frame = frame.f_back
        if project is not None:
            self.project_lines[project] += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="stack-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0

    def as_seconds(self, counter: collections.Counter) -> dict:
        scale = self.seconds / max(self.samples, 1)
        return {k: v * scale for k, v in counter.items()}

    def text(self, top: int) -> str:
        out = [f"{self.samples} samples of the main thread over {self.seconds:.2f} s (wall seconds, estimated)"]
        for title, counter in (("functions by inclusive time", self.inclusive),
                               ("source lines by own time", self.own_lines),
                               ("deepest line of this project on the stack", self.project_lines)):
            out.append(f"\n== {title}")
            secs = self.as_seconds(counter)
            out += [f"{v:9.3f}  {k}" for k, v in sorted(secs.items(), key=lambda kv: -kv[1])[:top]]
        return "\n".join(out) + "\n"


def sample_growth_lines(small: StackSampler, large: StackSampler, top: int) -> list[str]:
    out = []
    for title, attr in (("functions by inclusive time", "inclusive"),
                        ("deepest line of this project on the stack", "project_lines")):
        a, b = small.as_seconds(getattr(small, attr)), large.as_seconds(getattr(large, attr))
        rows = sorted(((b.get(k, 0.0) - a.get(k, 0.0), a.get(k, 0.0), b.get(k, 0.0), k) for k in set(a) | set(b)),
                      key=lambda r: -r[0])
        out.append(f"== {title}: growth (s), E, 2E")
        out += [f"{g:+8.3f} {x:8.3f} {y:8.3f}  {k}" for g, x, y, k in rows[:top]]
    return out


def stats_text(stats: pstats.Stats, top: int) -> str:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def torch_profile(model, tok, name: str, split, modes, average: bool, args, device: str) -> str:
    """The shared path on ``split`` under torch.profiler; writes the operator tables, returns the path."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        be.run_eval(model, tok, name, split, os.path.join(args.work_dir, "torch_profiler"), modes, average, False,
                    args, device, timing="none")
    table = prof.key_averages()
    parts = []
    if device.startswith("cuda"):
        parts.append("== by self device time\n" + table.table(sort_by="self_device_time_total", row_limit=args.top))
    parts.append("== by self CPU time\n" + table.table(sort_by="self_cpu_time_total", row_limit=args.top))
    path = os.path.join(args.out, f"torch_profile_E{args.exps_per_video}.txt")
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    be.log(f"torch.profiler tables: {path}")
    return path


# benchmark_eval's run-control options, which have no meaning here
IGNORED_BENCHMARK_ARGS = ("split_dir", "qframe_file", "json", "repeat", "scaling_repeat", "skip_naive", "skip_train",
                          "skip_scaling", "no_warmup", "time_budget", "train_steps", "train_warmup")


def main(argv=None) -> int:
    parser = be.build_parser()
    parser.description = __doc__
    parser.add_argument("--out", default="work_dirs/profile_eval", help="folder of the profile files (default: %(default)s)")
    parser.add_argument("--top", type=positive_int, default=60,
                        help="functions listed per table (default: %(default)s)")
    parser.add_argument("--raw", action="store_true", help="also write the cProfile files (profile_E<n>.prof)")
    parser.add_argument("--sampler", type=float, default=None, metavar="MS",
                        help="sample the main thread's stack every MS ms instead of cProfile (see above)")
    parser.add_argument("--torch-profiler", action="store_true",
                        help="also run the E split under torch.profiler (operators by device and CPU time)")
    args = parser.parse_args(argv)
    if args.sampler is not None and not args.sampler > 0:
        parser.error(f"--sampler: the interval must be > 0 ms, got {args.sampler}")
    ignored = [f"--{name.replace('_', '-')}" for name in IGNORED_BENCHMARK_ARGS
               if getattr(args, name) != parser.get_default(name)]
    if ignored:
        parser.error(f"{', '.join(ignored)}: benchmark_eval options that profile_eval does not use (it profiles the "
                     f"shared path on synthetic splits of E and 2E expressions per video)")
    problem = output_dir_problem(args.out, "--out")
    if problem:
        parser.error(problem)
    return run_reporting_user_errors(profile, args)


def profile(args) -> None:
    """Profile the shared path at E and 2E expressions per video (main and run_settings check the options)."""
    from projects.sasasa2va.evaluation import bench

    device, dtype, modes, average = be.run_settings(args)
    os.makedirs(args.out, exist_ok=True)
    model, tok, name = be.load_bench_model(args, device, dtype)
    forced = None if args.no_force_answer else bench.ForcedAnswer(model, tok, args.answer)  # noqa: F841 (hooked)
    if args.object_like_masks:
        bench.ObjectLikeMasks(model)
    e1 = args.exps_per_video
    splits = bench.make_bench_splits(os.path.join(args.work_dir, "data"), args.num_videos, [e1, 2 * e1],
                                     args.seed, args.min_frames, args.max_frames, (args.frame_size,))
    be.log(f"profile_eval: {name} on {device} ({dtype}); {args.num_videos} video(s) {splits[e1].frames} frames; "
           f"E = {e1} and {2 * e1} expressions per video; {len(modes)} mode(s)" + (" + averaging" if average else ""))
    # every mode once, as benchmark_eval's warm-up: first-call costs stay out of the profiles
    be.run_eval(model, tok, name, splits[e1], os.path.join(args.work_dir, "warmup"), modes, False, False, args,
                device, max_videos=1, timing="none")
    # the profiled run as benchmark_eval times it: on CUDA not synchronised per phase (phases from another run)
    inline = be.phase_timing(args, device) == "inline"
    profiles, samplers = {}, {}
    for e in (e1, 2 * e1):
        prof = None if args.sampler else cProfile.Profile()
        sampler = StackSampler(args.sampler / 1000.0) if args.sampler else None
        with sampler if sampler is not None else contextlib.nullcontext():
            if prof is not None:
                prof.enable()
            run = be.run_eval(model, tok, name, splits[e], os.path.join(args.work_dir, f"shared_{e}"), modes, average,
                              False, args, device, timing="inline" if inline else "none")
            if prof is not None:
                prof.disable()
        phased = run if inline else be.run_eval(model, tok, name, splits[e], os.path.join(args.work_dir, f"shared_{e}"),
                                                modes, average, False, args, device, timing="inline")
        phases = phased["phases_s"]
        rest = phased["wall_s"] - sum(phases.values())
        be.log(f"E={e}: {run['wall_s']:.2f} s wall (profiled), {run['model_s']:.2f} s in the model; phases"
               + ("" if inline else f" (another run, synchronised per phase call: {phased['wall_s']:.2f} s wall)")
               + ": " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + f", rest {rest:.2f}")
        if sampler is not None:
            samplers[e] = sampler
            atomic_write_text(os.path.join(args.out, f"sample_E{e}.txt"), sampler.text(args.top))
            continue
        if args.raw:
            prof.dump_stats(os.path.join(args.out, f"profile_E{e}.prof"))
        profiles[e] = pstats.Stats(prof)
        atomic_write_text(os.path.join(args.out, f"profile_E{e}.txt"), stats_text(profiles[e], args.top))
    if args.torch_profiler:
        torch_profile(model, tok, name, splits[e1], modes, average, args, device)
    if samplers:
        lines = sample_growth_lines(samplers[e1], samplers[2 * e1], args.top)
        path = os.path.join(args.out, "sample_growth.txt")
    else:
        lines = growth_lines(profiles[e1], profiles[2 * e1], args.top)
        path = os.path.join(args.out, "profile_growth.txt")
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"\n== time growth, E={e1} -> {2 * e1} (top {min(30, args.top)}; all in {path})")
    print("\n".join(lines[:31]))


if __name__ == "__main__":
    sys.exit(main())
