#!/usr/bin/env python
"""Decode-attention micro-benchmark (issue 6): one batched greedy-decoding step's attention, both ways.

    python tools/benchmark_decode_attention.py --device cuda --dtype bfloat16     # 4B shapes, seconds
    python tools/benchmark_decode_attention.py --device cpu --batches 1,4 --context 512

A decode batch of the shared path holds every (expression, mode) prompt's ~5k-token prefix in a
``RaggedKVCache``; each one-token step attends over it in every LLM layer. Timed per call, at the shapes
of such a step (ragged row lengths around ``--context``, the cache views ``RaggedKVCache.update`` returns,
the additive ``ragged_attention_mask``):

* sdpa   -- transformers' ``sdpa_attention_forward`` (``decode_attention="sdpa"``): with a
  padding mask it first expands every row's cached keys and values to all query heads (``repeat_kv``,
  heads / kv_heads copies), then runs masked SDPA;
* matmul -- ``_gqa_decode_attention`` (``decode_attention="matmul"``, the default): the query heads of a KV head
  folded into its rows, two batched matmuls on the cache as it is, float32 softmax.

Printed per batch size: milliseconds per call, per decode step (x ``--layers``), the KV bytes a call
must read at least, the CUDA memory a call allocates, and the largest difference between the two
outputs. Last line: ``decode_attention batch <B> sdpa_ms <a> matmul_ms <b> ratio <a/b>`` for the
largest batch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.utils.cli import (  # noqa: E402
    device_problem,
    exit_user_error,
    output_file_problem,
    positive_int,
    resolve_device,
    run_reporting_user_errors,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batches", default="1,8,25,50", help="decode batch sizes (comma list; default: %(default)s)")
    p.add_argument("--context", type=int, default=5200,
                   help="cached tokens per row, about (the 4B prompt prefix: 20 images x 256 tokens + template; "
                        "rows vary by +-2%%; default: %(default)s)")
    p.add_argument("--heads", type=int, default=16, help="query heads (default: Qwen2.5-3B's, %(default)s)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    p.add_argument("--head-dim", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--layers", type=int, default=36, help="LLM layers, for the per-step figure (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per case (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


class _Attention:
    """What ``sdpa_attention_forward`` reads off an attention module."""

    def __init__(self, groups: int):
        self.num_key_value_groups = groups
        self.is_causal = True


def make_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, dtype, device, gen):
    """(module, query, key view, value view, mask, row lengths) of one decode step over a ragged batch."""
    import torch

    from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import ragged_attention_mask

    spread = max(1, context // 50)
    lengths = [context + int(x) for x in torch.randint(-spread, spread + 1, (batch,), generator=gen)]
    need = max(lengths) + 1
    capacity = need + 64  # RaggedKVCache keeps room ahead: update() returns views of [:, :, :need]

    def buffer():
        return torch.randn((batch, kv_heads, capacity, head_dim), generator=gen).to(device=device, dtype=dtype)

    key, value = buffer()[:, :, :need], buffer()[:, :, :need]
    query = torch.randn((batch, heads, 1, head_dim), generator=gen).to(device=device, dtype=dtype)
    mask = ragged_attention_mask(lengths, 1, dtype, device)
    return _Attention(heads // kv_heads), query, key, value, mask, lengths


def time_call(fn, iters: int, cuda: bool, device) -> tuple[float, float | None, object]:
    """(milliseconds per call, CUDA MB allocated beyond the inputs during a call or None, last output)."""
    import torch

    out = fn()  # warm-up: kernels, allocator
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    ms = 1000.0 * (time.perf_counter() - t0) / iters
    extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return ms, extra, out


def main(argv=None) -> int:
    return run_reporting_user_errors(benchmark, build_parser().parse_args(argv))


def benchmark(args) -> None:
    """Time both attentions at every batch size (bad option values exit with status 2 first)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from projects.sasasa2va.evaluation.model_loading import resolve_dtype
    from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import _gqa_decode_attention
    from projects.sasasa2va.utils.io import atomic_write_json

    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        exit_user_error(f"--batches must be a comma list of integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.context < 1 or args.iters < 1 or args.layers < 1:
        exit_user_error("--batches, --context, --iters and --layers must be >= 1")
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        exit_user_error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    problem = device_problem(args.device) or (args.json and output_file_problem(args.json, "--json"))
    if problem:  # (the figures are written after the timing)
        exit_user_error(problem)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    device = "cuda:0" if device == "cuda" else device
    dtype = resolve_dtype(args.dtype, device)
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    elem = torch.empty((), dtype=dtype).element_size()
    print(f"decode attention: {name}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}; heads "
          f"{args.heads}, kv heads {args.kv_heads}, head dim {args.head_dim}, ~{args.context} cached tokens/row, "
          f"{args.layers} layers/step", flush=True)
    print(f"{'batch':>6}{'sdpa ms':>10}{'matmul ms':>11}{'ratio':>8}{'sdpa ms/step':>14}{'matmul ms/step':>16}"
          f"{'KV MB':>9}{'sdpa +MB':>10}{'matmul +MB':>12}{'max |diff|':>12}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for batch in batches:
        module, q, k, v, mask, lengths = make_case(batch, args.context, args.heads, args.kv_heads, args.head_dim,
                                                   dtype, device, gen)
        scale = args.head_dim ** -0.5
        with torch.no_grad():
            sdpa_ms, sdpa_mb, a = time_call(lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
                                            args.iters, cuda, device)
            mm_ms, mm_mb, b = time_call(lambda: _gqa_decode_attention(module, q, k, v, mask, scaling=scale)[0],
                                        args.iters, cuda, device)
        diff = float((a.float() - b.float()).abs().max())
        kv_mb = 2 * sum(lengths) * args.kv_heads * args.head_dim * elem / 2**20
        row = {"batch": batch, "sdpa_ms": sdpa_ms, "matmul_ms": mm_ms, "ratio": sdpa_ms / mm_ms,
               "sdpa_ms_per_step": sdpa_ms * args.layers, "matmul_ms_per_step": mm_ms * args.layers,
               "kv_mb": kv_mb, "sdpa_extra_mb": sdpa_mb, "matmul_extra_mb": mm_mb, "max_abs_diff": diff}
        rows.append(row)

        def mb(x):
            return f"{'-':>10}" if x is None else f"{x:>10.0f}"

        print(f"{batch:>6}{sdpa_ms:>10.3f}{mm_ms:>11.3f}{row['ratio']:>8.2f}{row['sdpa_ms_per_step']:>14.1f}"
              f"{row['matmul_ms_per_step']:>16.1f}{kv_mb:>9.0f}{mb(sdpa_mb)}{mb(mm_mb):>12}{diff:>12.2e}", flush=True)
        del q, k, v, mask, a, b
        if cuda:
            torch.cuda.empty_cache()
    if args.json:
        atomic_write_json(args.json, {"device": device, "device_name": name, "dtype": str(dtype),
                                      "torch": torch.__version__, "args": vars(args), "rows": rows}, indent=1)
        print(f"figures written to {args.json}", flush=True)
    last = rows[-1]
    print(f"decode_attention batch {last['batch']} sdpa_ms {last['sdpa_ms']:.3f} matmul_ms {last['matmul_ms']:.3f} "
          f"ratio {last['ratio']:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
