#!/usr/bin/env python
"""Training benchmark of the tiny config: optimizer steps per second and peak memory.

    python tools/benchmark_train.py [--device cpu|cuda] [--steps 8] [--warmup 2] [--json FILE]

Builds the model of ``projects/sasasa2va/configs/sasasa2va_tiny.py`` (in a work folder laid out like the
repo root: small synthetic data + tiny checkpoints, created when missing), takes real collated training
samples (the config's MeViS dataset: KFC video sample with 5 objects), and times full steps -- forward
(loss), backward, gradient clipping, AdamW -- after ``--warmup`` untimed steps. The loop is the core of
the mmengine train loop without DeepSpeed (bf16 autocast + fp32 trainable weights on CUDA, as the
config's ``dtype='auto'``; float32 on CPU). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA,
the process's maxrss (``resource.getrusage``) on CPU. Used by tools/benchmark_eval.py (own process, so
the figures are this benchmark's alone). Last line: ``train_steps_per_s <x> peak_mem_mb <y>``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY_CONFIG = os.path.join(ROOT, "projects", "sasasa2va", "configs", "sasasa2va_tiny.py")
# small synthetic world: enough samples for a few distinct batches, fast to generate
SMALL_DATA = dict(num_train_videos=4, num_valid_u_videos=0, num_valid_videos=0, num_revos_videos=1,
                  num_rvos_videos=1, num_sav_videos=1, num_images=2, min_frames=8, max_frames=16)
MEVIS_INDEX = 4  # position of the MeViS dataset in the tiny config's dataset list


def ensure_config_imports() -> list:
    """The base config imports xtuner's LengthGroupedSampler and TrainLoop. This benchmark uses only the
    config's model and dataset entries, so where xtuner is not installed (e.g. a GPU machine given only
    the pinned wheels) inert stand-ins are registered for those two names; returns the stubbed modules."""
    import importlib
    import importlib.machinery
    import types

    try:
        importlib.import_module("xtuner.dataset.samplers")
        importlib.import_module("xtuner.engine.runner")
        return []
    except Exception:
        pass

    class _Unavailable:  # never instantiated by this benchmark
        def __init__(self, *args, **kwargs):
            raise RuntimeError("xtuner is not installed (benchmark_train.py stand-in)")

    made = []
    for name in ("xtuner", "xtuner.dataset", "xtuner.dataset.samplers", "xtuner.engine", "xtuner.engine.runner"):
        mod = types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules resolve
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = mod
        made.append(name)
    sys.modules["xtuner.dataset.samplers"].LengthGroupedSampler = type("LengthGroupedSampler", (_Unavailable,), {})
    sys.modules["xtuner.engine.runner"].TrainLoop = type("TrainLoop", (_Unavailable,), {})
    sys.modules["xtuner"].dataset = sys.modules["xtuner.dataset"]
    sys.modules["xtuner"].engine = sys.modules["xtuner.engine"]
    sys.modules["xtuner.dataset"].samplers = sys.modules["xtuner.dataset.samplers"]
    sys.modules["xtuner.engine"].runner = sys.modules["xtuner.engine.runner"]
    return made


def prepare_root(root: str, seed: int = 0) -> None:
    """<root>/data/synthetic and <root>/pretrained/tiny, as the tiny config's relative paths expect."""
    from projects.sasasa2va.datasets.synthetic import generate_all
    from projects.sasasa2va.models.tiny import make_tiny_for_config

    data = os.path.join(root, "data", "synthetic")
    if not os.path.isfile(os.path.join(data, "synthetic_info.json")):
        generate_all(data, seed=seed, **SMALL_DATA)
    tiny = os.path.join(root, "pretrained", "tiny")
    if not os.path.isfile(os.path.join(tiny, "tiny_manifest.json")):
        make_tiny_for_config(tiny, TINY_CONFIG)  # random weights: this measures speed, not learning


def run(device: str = "cpu", steps: int = 8, warmup: int = 2, work_dir: str = "work_dirs/benchmark_train",
        seed: int = 0, num_batches: int = 2, quiet: bool = True) -> dict:
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS

    from projects.sasasa2va.datasets.collate import sasasa2va_collate_fn
    from projects.sasasa2va.datasets.refvos import build_object

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    root = os.path.abspath(work_dir)
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    prepare_root(root, seed)
    dev = torch.device(device)
    cwd = os.getcwd()
    os.chdir(root)  # the tiny config's data/checkpoint paths are relative to the repo root
    try:
        stubbed = ensure_config_imports()
        cfg = Config.fromfile(TINY_CONFIG)
        if dev.type != "cuda":
            cfg.model.dtype = "float32"  # 'auto' would pick bf16 whenever CUDA exists; CPU runs float32
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            torch.manual_seed(seed)
            model = MODELS.build(cfg.model)
            dataset = build_object(cfg.train_dataloader.dataset.datasets[MEVIS_INDEX])
            batches = [sasasa2va_collate_fn([dataset[i % len(dataset)]]) for i in range(num_batches)]
    finally:
        os.chdir(cwd)
    model = model.to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    setup_s = time.perf_counter() - t0
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        data = model.data_preprocessor(batch, True)
        losses = model(**data, mode="loss")
        loss = sum(v for k, v in losses.items() if "loss" in k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    losses = []
    for i in range(warmup):
        losses.append(step(i))
    if cuda:
        torch.cuda.synchronize(dev)
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        losses.append(step(i))
    if cuda:
        torch.cuda.synchronize(dev)
    timed = time.perf_counter() - t1
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        peak_kind = "torch.cuda.max_memory_allocated"
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        peak_kind = "ru_maxrss (process)"
    trainable = sum(p.numel() for p in params)
    return {
        "config": os.path.relpath(TINY_CONFIG, ROOT), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "dtype": str(model.compute_dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "steps": steps, "warmup": warmup, "seconds": timed, "steps_per_s": steps / timed,
        "seconds_per_step": timed / steps, "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind,
        "trainable_params": trainable, "params": sum(p.numel() for p in model.parameters()),
        "setup_seconds": setup_s, "first_loss": losses[0], "last_loss": losses[-1],
        "batch": (f"1 MeViS KFC sample (tiny config: 20 MLLM images of {cfg.image_size} px x {cfg.tokens_per_image} "
                  f"tokens, {cfg.sam2_image_size} px SAM2)"),
        "xtuner_stubbed": bool(stubbed),
    }


def format_result(r: dict) -> str:
    return (f"train ({r['config']}, {r['device_name']}, {r['dtype']}): {r['steps_per_s']:.3f} steps/s "
            f"({r['seconds_per_step'] * 1000:.0f} ms/step over {r['steps']} steps after {r['warmup']} warm-up), "
            f"peak memory {r['peak_mem_mb']:.0f} MB [{r['peak_mem_kind']}], "
            f"{r['trainable_params'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M params trained, "
            f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")


def main(argv=None) -> int:
    from projects.sasasa2va.utils.cli import device_problem, output_file_problem, positive_int, resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--work-dir", default="work_dirs/benchmark_train", help="data/checkpoint folder (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    problem = (args.json and output_file_problem(args.json, "--json")) or device_problem(args.device)
    if problem:
        p.error(problem)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    r = run(device, args.steps, args.warmup, args.work_dir, args.seed)
    print(format_result(r), flush=True)
    if args.json:
        from projects.sasasa2va.utils.io import atomic_write_json

        atomic_write_json(args.json, r, indent=1)
    print(f"train_steps_per_s {r['steps_per_s']:.4f} peak_mem_mb {r['peak_mem_mb']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
