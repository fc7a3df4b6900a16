"""One evaluation job's ranks: the process group (torchrun's environment, nccl on CUDA, gloo on CPU) and
the marker files through which rank 0 learns that every rank has finished (or why one failed) without
holding a collective open for the hours a shard may take."""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

from projects.sasasa2va.utils.io import atomic_write_json

DIST_DIR = ".dist"  # <work_dir>/.dist/rank<r>.<nonce>.json: each rank's done / failed marker


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized: bool = False
    nonce: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(name: str) -> int:
    v = os.environ.get(name)
    if v is None:
        raise RuntimeError(f"--launcher pytorch needs the {name} environment variable (start the job with "
                           "projects/sasasa2va/evaluation/dist_test.sh or torchrun)")
    try:
        return int(v)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(launcher: str, device: str | None, timeout_s: float) -> DistContext:
    """launcher 'none' -> one process; 'pytorch' -> RANK/WORLD_SIZE/LOCAL_RANK from the environment,
    nccl on CUDA, gloo on CPU, with a timeout."""
    import torch

    if launcher not in ("none", "pytorch"):
        raise ValueError(f"unknown launcher {launcher!r}; expected 'none' or 'pytorch'")
    ctx = DistContext()
    if launcher == "pytorch":
        ctx.rank, ctx.world_size = env_int("RANK"), env_int("WORLD_SIZE")
        ctx.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{ctx.local_rank}"
    ctx.device = device
    if launcher == "pytorch":
        import datetime

        import torch.distributed as dist

        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        ctx.initialized = True
        obj = [uuid.uuid4().hex if ctx.rank == 0 else None]
        dist.broadcast_object_list(obj, src=0)  # also the start barrier
        ctx.nonce = str(obj[0])
    return ctx


def barrier(ctx: DistContext) -> None:
    if ctx.initialized:
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.initialized:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        ctx.initialized = False


def marker_path(work_dir: str, ctx: DistContext, rank: int) -> str:
    return os.path.join(work_dir, DIST_DIR, f"rank{rank}.{ctx.nonce}.json")


def write_marker(work_dir: str, ctx: DistContext, status: str, **info) -> None:
    if ctx.world_size > 1:
        atomic_write_json(marker_path(work_dir, ctx, ctx.rank), {"rank": ctx.rank, "status": status, **info})


def wait_for_ranks(work_dir: str, ctx: DistContext, timeout_s: float, poll_s: float = 0.2) -> list[dict]:
    """Rank 0: wait for every rank's done/failed marker; a failed rank's error is raised here."""
    markers: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for r in range(ctx.world_size):
            if r in markers:
                continue
            path = marker_path(work_dir, ctx, r)
            if os.path.isfile(path):
                with open(path, "r", encoding="utf-8") as f:
                    markers[r] = json.load(f)
                if markers[r].get("status") != "done":
                    raise RuntimeError(f"rank {r} failed:\n{markers[r].get('error', '(no error text)')}")
        if len(markers) == ctx.world_size:
            return [markers[r] for r in range(ctx.world_size)]
        if time.monotonic() > deadline:
            missing = sorted(set(range(ctx.world_size)) - set(markers))
            raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s (no marker in "
                               f"{os.path.join(work_dir, DIST_DIR)})")
        time.sleep(poll_s)


def clean_markers(work_dir: str, keep_nonce: str | None) -> None:
    d = os.path.join(work_dir, DIST_DIR)
    if not os.path.isdir(d):
        return
    for name in os.listdir(d):
        if keep_nonce is None or f".{keep_nonce}." not in name:
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
    if keep_nonce is None:
        try:
            os.rmdir(d)
        except OSError:
            pass
