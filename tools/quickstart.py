"""The embedded default main job: the whole SaSaSa2VA pipeline on a CPU, no downloads.

data -> tiny checkpoints -> stand-in pretraining (tools/pretrain_tiny.py) -> training (tools/dist.sh)
-> export (convert_to_hf.py) -> five-mode evaluation + selective averaging on synthetic valid_u -> J&F
-> language-blind control -> synthetic valid submission zip -> visualisation page. Every stage runs the same CLI a user would run, and its
wall time lands in ``<work-dir>/summary.json``. A job cut short (kill, reboot) continues with ``--resume``
and the same options: finished stages are kept, training goes on from its newest complete checkpoint and
the evaluations from their finished expressions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# counts >= 1: 0 would silently mean the default (or fail after the slow stages: --gpus)
from projects.sasasa2va.utils.cli import positive_int  # noqa: E402
from projects.sasasa2va.utils.io import atomic_write_json  # noqa: E402

MODES = ("uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus")
CONFIG = "projects/sasasa2va/configs/sasasa2va_tiny.py"
PY = sys.executable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", default=ROOT,
                   help="folder holding data/synthetic and pretrained/tiny (the tiny config's relative paths); "
                        "default: the repository root")
    p.add_argument("--work-dir", default="work_dirs/quickstart", help="where every output goes (under --run-root)")
    p.add_argument("--iters", type=positive_int, default=None, help="training iterations (default: the config's)")
    p.add_argument("--pretrain-steps", type=positive_int, default=None,
                   help="stand-in pretraining steps (default: the config's auto_prepare.stand_in_pretraining)")
    p.add_argument("--gpus", type=positive_int, default=1, help="processes for training and evaluation")
    p.add_argument("--max-videos", type=positive_int, default=None,
                   help="evaluate only the first N videos (scores cover those; no submission zip)")
    p.add_argument("--synthetic-args", default="", help="extra arguments for tools/make_synthetic_data.py")
    p.add_argument("--train-args", default="", help="extra --cfg-options for training, e.g. 'a=1 b=2'")
    p.add_argument("--blind-expression", default="the object",
                   help="expression given to every object by the language-blind control")
    p.add_argument("--skip-train", action="store_true",
                   help="reuse the last checkpoint in the work dir (and the tiny checkpoints it was trained from)")
    p.add_argument("--resume", action="store_true",
                   help="continue a run of this job that was cut short (same --run-root, --work-dir and options): "
                        "the synthetic data must match, the tiny checkpoints and their stand-in pretraining are "
                        "reused once complete, training continues from its newest complete checkpoint, the export "
                        "is kept when it holds that checkpoint, and then the evaluations keep their finished "
                        "expressions; stage logs are appended to")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads of every stage, per process (OMP_NUM_THREADS). Default: the stand-in "
                        "pretraining uses torch's default (one per core), training and evaluation one each (the "
                        "launchers' default) -- how the README's figures were measured; more threads run faster "
                        "on many cores but change the weights' last bits, so the scores differ slightly")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="cap on generated answer tokens in evaluation, >= 1 (short smoke runs of barely trained "
                        "models)")
    args = p.parse_args(argv)
    if args.resume and args.skip_train:
        p.error("--resume continues the training; --skip-train skips it: give one of them")
    return args


def tiny_checkpoint_args() -> list[str]:
    """tools/make_tiny_pretrained.py options matching the tiny config's ``auto_prepare.tiny_pretrained``."""
    from mmengine.config import Config

    from projects.sasasa2va.models.tiny import tiny_cli_args

    return tiny_cli_args(Config.fromfile(os.path.join(ROOT, CONFIG)).auto_prepare.tiny_pretrained)


def run(cmd: list[str], log_path: str, env: dict | None = None, cwd: str = ROOT, append: bool = False) -> None:
    """Run one stage, teeing its output to a log (``append``: after what the log holds, e.g. the run that
    was cut short); a failure stops the job with the log's tail."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a" if append else "w") as log:
        if append:
            log.write(f"\n===== quickstart --resume, {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: list[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line])[-40:]
            if _interesting(line):
                print("  " + line.rstrip()[:200], flush=True)
        rc = proc.wait()
    if rc != 0:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"stage failed (exit {rc}): {' '.join(cmd)}\nfull log: {log_path}")


def _interesting(line: str) -> bool:
    """A stage's log line worth echoing; never a progress bar's update (each carriage return reads as a line)."""
    if re.search(r"\d%\|", line):
        return False
    pattern = r"(Iter\(train\)|stand-in pretraining step|J&F|Saved|saved|error|Error|wrote|Wrote|done)"
    return bool(re.search(pattern, line))


def last_line(log_path: str) -> str:
    with open(log_path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1] if lines else ""


def parse_jf(line: str) -> dict:
    m = re.match(r"J&F ([\d.]+) J ([\d.]+) F ([\d.]+)$", line)
    if not m:
        raise SystemExit(f"unexpected metric line: {line!r}")
    return {"J&F": float(m.group(1)), "J": float(m.group(2)), "F": float(m.group(3))}


def pretraining_marker(run_root: str) -> str:
    """The stand-in pretraining's marker for the tiny config run from ``run_root`` (present once it is done)."""
    from mmengine.config import Config

    from projects.sasasa2va.models.stand_in_pretraining import finish_cut_short_save, marker_path

    pth = os.path.join(run_root, Config.fromfile(os.path.join(ROOT, CONFIG)).model.pretrained_pth)
    finish_cut_short_save(pth)  # a kill between its last two renames: settled before the marker is read
    return marker_path(pth)


def checkpoint_identity(path: str) -> dict:
    """What says an export holds this checkpoint: its path, size and modification time (a file, or a
    DeepSpeed folder)."""
    st = os.stat(path)
    return {"checkpoint": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def export_is_current(hf_dir: str, record: str, ckpt: str) -> bool:
    """``hf_dir`` is a finished export of ``ckpt`` (``record`` is written after the export succeeded)."""
    if not os.path.isfile(record) or not os.path.isfile(os.path.join(hf_dir, "config.json")):
        return False
    if not any(n.endswith(".safetensors") for n in os.listdir(hf_dir)):
        return False
    try:
        with open(record, "r", encoding="utf-8") as f:
            return json.load(f) == checkpoint_identity(ckpt)
    except (OSError, ValueError):
        return False


def latest_checkpoint(train_dir: str) -> str:
    marker = os.path.join(train_dir, "last_checkpoint")
    if os.path.exists(marker):
        with open(marker) as f:
            path = f.read().strip()
        if os.path.exists(path):
            return path
    from projects.sasasa2va.utils.checkpoint import complete_checkpoints

    found = complete_checkpoints(train_dir)  # (a checkpoint cut short by a kill is not taken)
    if not found:
        raise SystemExit(f"no checkpoint found in {train_dir}")
    return os.path.join(train_dir, found[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_root = os.path.abspath(args.run_root)
    wd = os.path.join(run_root, args.work_dir)
    logs = os.path.join(wd, "logs")
    data_root = os.path.join(run_root, "data", "synthetic")
    pretrained = os.path.join(run_root, "pretrained", "tiny")
    tool = lambda name: os.path.join(ROOT, name)  # noqa: E731
    times: dict[str, float] = {}
    t_all = time.time()
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}

    def run_stage(cmd, log_path, **kw):
        return run(cmd, log_path, env=threads, **kw)

    def stage(name, fn):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.time()
        out = fn()
        times[name] = round(time.time() - t0, 1)
        print(f"=== {name}: {times[name]:.1f}s", flush=True)
        return out

    resume = args.resume
    # --resume: no --force, so data of other settings than the interrupted run's is refused, not replaced
    stage("data", lambda: run_stage([PY, tool("tools/make_synthetic_data.py"), "--root", data_root, "--quiet"]
                                    + ([] if resume else ["--force"]) + shlex.split(args.synthetic_args),
                                    os.path.join(logs, "data.log"), append=resume))
    if args.skip_train:  # the kept checkpoint was trained on these base weights: regenerating them could differ
        print("[quickstart] --skip-train: the tiny checkpoints and their stand-in pretraining are reused", flush=True)
        times["pretrained"] = times["stand_in_pretraining"] = 0.0
    elif resume and os.path.isfile(marker := pretraining_marker(run_root)):
        print(f"[quickstart] --resume: the tiny checkpoints and their stand-in pretraining are done "
              f"({marker}): reused", flush=True)
        times["pretrained"] = times["stand_in_pretraining"] = 0.0
    else:
        tiny = tiny_checkpoint_args()
        stage("pretrained", lambda: run_stage([PY, tool("tools/make_tiny_pretrained.py"), "--out", pretrained, *tiny,
                                               "--force"], os.path.join(logs, "pretrained.log"), append=resume))
        steps = ["--steps", str(args.pretrain_steps)] if args.pretrain_steps is not None else []
        stage("stand_in_pretraining", lambda: run_stage([PY, tool("tools/pretrain_tiny.py"), tool(CONFIG),
                                                         "--no-progress", *steps],
                                                        os.path.join(logs, "stand_in_pretraining.log"),
                                                        cwd=run_root, append=resume))

    train_dir = os.path.join(wd, "train")
    cfg_opts = []
    if args.iters is not None:  # iteration-based run (warm-up = first 20%)
        cfg_opts += ["train_cfg.max_epochs=None", f"train_cfg.max_iters={args.iters}",
                     "param_scheduler.0.end=0.2", "param_scheduler.1.begin=0.2"]
    cfg_opts += shlex.split(args.train_args)
    cfg_arg = ["--cfg-options", *cfg_opts] if cfg_opts else []
    from projects.sasasa2va.utils.checkpoint import complete_checkpoints

    resume_train = resume and os.path.isdir(train_dir) and bool(complete_checkpoints(train_dir))
    if resume_train:  # continues from the newest complete checkpoint, in place
        print(f"[quickstart] --resume: training continues in {train_dir}", flush=True)
        stage("train", lambda: run_stage(["bash", tool("tools/dist.sh"), "train", tool(CONFIG), str(args.gpus),
                                          "--work-dir", train_dir, "--resume", "auto", *cfg_arg],
                                         os.path.join(logs, "train.log"), cwd=run_root, append=True))
    elif not args.skip_train:
        if os.path.isdir(train_dir):  # a rerun trains afresh; the previous training is kept beside it
            previous = train_dir + ".previous"
            if os.path.isdir(previous):
                shutil.rmtree(previous)
            os.rename(train_dir, previous)
            print(f"[quickstart] the previous training moved to {previous}", flush=True)
        stage("train", lambda: run_stage(["bash", tool("tools/dist.sh"), "train", tool(CONFIG), str(args.gpus),
                                          "--work-dir", train_dir, *cfg_arg],
                                         os.path.join(logs, "train.log"), cwd=run_root))
    ckpt = latest_checkpoint(train_dir)

    hf_dir = os.path.join(wd, "hf")
    record = os.path.join(wd, "hf_checkpoint.json")  # which checkpoint hf_dir holds (written after the export)
    keep_export = resume and export_is_current(hf_dir, record, ckpt)
    if keep_export:
        print(f"[quickstart] --resume: {hf_dir} already holds {ckpt}: kept (and so are the finished expressions "
              f"of the evaluations)", flush=True)
        times["export"] = 0.0
    else:
        if os.path.exists(record):
            os.unlink(record)  # the folder is about to change
        stage("export", lambda: run_stage([PY, tool("projects/sasasa2va/hf/convert_to_hf.py"), tool(CONFIG),
                                           "--pth-model", ckpt, "--save-path", hf_dir, "--overwrite"],
                                          os.path.join(logs, "export.log"), cwd=run_root, append=resume))
        atomic_write_json(record, checkpoint_identity(ckpt))

    # --overwrite: this job owns its evaluation folders, and a rerun evaluates the model it just built; with
    # --resume and the export kept, the evaluations continue (their work dirs record the model they ran)
    eval_common = ["--data-root", os.path.join(run_root, "data")] + ([] if keep_export else ["--overwrite"])
    if args.max_videos:
        eval_common += ["--max-videos", str(args.max_videos)]
    if args.max_new_tokens is not None:
        eval_common += ["--max-new-tokens", str(args.max_new_tokens)]
    dist_test = ["bash", tool("projects/sasasa2va/evaluation/dist_test.sh"),
                 tool("projects/sasasa2va/evaluation/ref_vos_eval.py"), hf_dir, str(args.gpus)]
    eval_u = os.path.join(wd, "eval_valid_u")
    stage("eval_valid_u", lambda: run(dist_test + ["--dataset", "SYN_MEVIS_U", "--work-dir", eval_u,
                                                   "--mode", ",".join(MODES), "--average"] + eval_common,
                                      os.path.join(logs, "eval_valid_u.log"), append=resume))
    blind = os.path.join(wd, "eval_blind")
    stage("eval_blind", lambda: run(dist_test + ["--dataset", "SYN_MEVIS_U", "--work-dir", blind,
                                                 "--mode", "uniform", "--blind-expression",
                                                 args.blind_expression] + eval_common,
                                    os.path.join(logs, "eval_blind.log"), append=resume))

    split_u = os.path.join(data_root, "mevis", "valid_u")
    scores: dict[str, dict] = {}

    def score_all():
        runs = {m: os.path.join(eval_u, "modes", m, "results.json") for m in MODES}
        runs["average"] = os.path.join(eval_u, "results.json")
        runs["blind"] = os.path.join(blind, "results.json")
        for name, res in runs.items():
            log = os.path.join(logs, f"metrics_{name}.log")
            partial = ["--only-present"] if args.max_videos else []  # score the evaluated videos only
            run_stage([PY, "tools/eval_mevis.py", "--split-dir", split_u, "--results", res, "--no-progress", *partial],
                      log)  # (a log read for its last line: no bar in it)
            scores[name] = parse_jf(last_line(log))
    stage("metrics", score_all)

    eval_v = os.path.join(wd, "eval_valid")
    split_v = os.path.join(data_root, "mevis", "valid")
    zip_path = os.path.join(wd, "submission_valid.zip")
    def submission():
        run(dist_test + ["--dataset", "SYN_MEVIS", "--work-dir", eval_v, "--mode", ",".join(MODES),
                         "--average", "--submit"] + eval_common, os.path.join(logs, "eval_valid.log"), append=resume)
        if args.max_videos:  # the server (and the packer's check) needs every video of the split
            print("[quickstart] --max-videos: no submission zip (a zip must cover the whole split)", flush=True)
            return
        run_stage([PY, "tools/make_submission_zip.py", "--ann-dir", os.path.join(eval_v, "Annotations"),
                   "--split-dir", split_v, "--out", zip_path], os.path.join(logs, "zip.log"))
    stage("submission", submission)

    vis_dir = os.path.join(wd, "visualization")
    stage("visualize", lambda: run_stage([PY, "tools/visualize.py", "--split-dir", split_u, "--results",
                                          os.path.join(eval_u, "results.json"), "--out", vis_dir,
                                          "--max-expressions", "24"], os.path.join(logs, "visualize.log")))
    times["total"] = round(time.time() - t_all, 1)

    summary = {name: scores[name] for name in list(MODES) + ["average", "blind"]}
    summary["language_blind"] = summary.pop("blind")
    summary["average_by_kind"] = jf_by_kind(os.path.join(eval_u, "mevis_valu_per_expression.csv"),
                                            os.path.join(split_u, "meta_expressions.json"))
    summary["times_s"] = times
    summary["outputs"] = {"checkpoint": ckpt, "hf_dir": hf_dir, "valid_u": eval_u, "blind": blind,
                          "submission_zip": None if args.max_videos else zip_path,
                          "visualization": os.path.join(vis_dir, "index.html")}
    atomic_write_json(os.path.join(wd, "summary.json"), summary, indent=2)
    print_table(summary)
    return summary


def jf_by_kind(per_expression_csv: str, meta_file: str) -> dict:
    """{kind: {"count", "J&F"}} of the averaged run, by how the expression picks its target
    (``synthetic.expression_kind``): shows which expressions the tiny model has learnt."""
    import csv

    from projects.sasasa2va.datasets.synthetic import EXPRESSION_KINDS, expression_kind

    with open(meta_file, "r", encoding="utf-8") as f:
        videos = json.load(f)["videos"]
    scores: dict[str, list[float]] = {k: [] for k in EXPRESSION_KINDS}
    with open(per_expression_csv, "r", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            exp = videos[row["video"]]["expressions"][row["exp_id"]]
            scores[expression_kind(exp["exp"], len(exp["anno_id"]))].append(float(row["J&F"]))
    return {k: {"count": len(v), "J&F": round(100.0 * sum(v) / len(v), 2) if v else None}
            for k, v in scores.items()}


def print_table(summary: dict) -> None:
    print("\nSynthetic MeViS valid_u (percent)")
    print(f"{'run':<22}{'J':>8}{'F':>8}{'J&F':>8}")
    for name in list(MODES) + ["average", "language_blind"]:
        s = summary[name]
        print(f"{name:<22}{s['J']:>8.2f}{s['F']:>8.2f}{s['J&F']:>8.2f}")
    kinds = summary.get("average_by_kind") or {}
    print("average J&F by expression kind: " + ", ".join(
        f"{k} {v['J&F']:.2f} ({v['count']})" for k, v in kinds.items() if v["count"]))
    print("\nstage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["times_s"].items()))
    for k, v in summary["outputs"].items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
