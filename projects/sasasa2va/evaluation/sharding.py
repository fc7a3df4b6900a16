"""Dataset items and their distribution over ranks (spec evaluation.md §4.2-4.3).

Item = one expression; items are enumerated video by video in the meta file's order, expression ids
sorted as strings (the order ``read_meta_expressions`` keeps). Two schemes:

* ``expression``: ``DistributedSampler(shuffle=False, drop_last=False)`` semantics: the index list is
  padded to ceil(N/W)*W by re-appending the first items, rank r takes positions r, r+W, r+2W, ...
* ``video`` (default): whole videos go to ranks, balanced by expression count with a deterministic
  greedy longest-first rule; each rank iterates its videos in dataset order (frames loaded once).

``gather`` puts per-rank results back in dataset order, without duplicates or gaps, for any W.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

SCHEMES = ("video", "expression")


@dataclass(frozen=True)
class Item:
    """One (video, expression) with its dataset index."""

    index: int
    video_id: str
    exp_id: str


def enumerate_items(records: dict) -> list[Item]:
    """{video_id: VideoRecord} -> items in dataset order (videos in dict order, exp ids sorted as str)."""
    items = []
    for vid, rec in records.items():
        for eid in sorted(rec.expressions, key=str):
            items.append(Item(len(items), str(vid), str(eid)))
    return items


def _check(world_size: int, rank: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def padded_length(num_items: int, world_size: int) -> int:
    """ceil(N/W)*W (DistributedSampler total size); 0 items stay 0."""
    return -(-num_items // world_size) * world_size


def shard_expression(num_items: int, world_size: int, rank: int, include_padding: bool = True) -> list[int]:
    """Item indices of ``rank`` under DistributedSampler semantics (padding = first items again).

    ``include_padding=False`` drops the padded duplicates (they would only recompute items another
    rank already owns); the order of the remaining indices is unchanged.
    """
    _check(world_size, rank)
    total = padded_length(num_items, world_size)
    padded = list(range(num_items))
    while len(padded) < total:
        padded += list(range(num_items))[: total - len(padded)]
    positions = range(rank, total, world_size)
    return [padded[p] for p in positions if include_padding or p < num_items]


def video_assignment(items: Sequence[Item], world_size: int) -> dict[str, int]:
    """{video_id: rank}: videos sorted by expression count (descending, ties by dataset order) each go
    to the currently least-loaded rank (ties: lowest rank)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    counts: dict[str, int] = {}
    for it in items:
        counts[it.video_id] = counts.get(it.video_id, 0) + 1
    order = {v: i for i, v in enumerate(counts)}
    load = [0] * world_size
    owner: dict[str, int] = {}
    for vid in sorted(counts, key=lambda v: (-counts[v], order[v])):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[vid] = r
        load[r] += counts[vid]
    return owner


def shard_video(items: Sequence[Item], world_size: int, rank: int) -> list[int]:
    """Item indices of ``rank`` when whole videos are assigned (dataset order within the rank)."""
    _check(world_size, rank)
    owner = video_assignment(items, world_size)
    return [it.index for it in items if owner[it.video_id] == rank]


def shard_indices(items: Sequence[Item], world_size: int, rank: int, scheme: str = "video",
                  include_padding: bool = True) -> list[int]:
    """Dispatch on ``scheme`` (``video`` or ``expression``)."""
    if scheme == "video":
        return shard_video(items, world_size, rank)
    if scheme == "expression":
        return shard_expression(len(items), world_size, rank, include_padding=include_padding)
    raise ValueError(f"unknown sharding scheme {scheme!r}; expected one of {SCHEMES}")


def gather(parts: Sequence[Sequence[Any]], shards: Sequence[Sequence[int]], num_items: int) -> list[Any]:
    """Dataset-ordered list from per-rank results ``parts[r]`` computed for item indices ``shards[r]``.

    Padded duplicates (an index seen again) are dropped; a missing index is an error, as is a part
    whose length differs from its shard.
    """
    if len(parts) != len(shards):
        raise ValueError(f"{len(parts)} result parts for {len(shards)} shards")
    out: list[Any] = [None] * num_items
    seen = [False] * num_items
    for r, (part, shard) in enumerate(zip(parts, shards)):
        if len(part) != len(shard):
            raise ValueError(f"rank {r}: {len(part)} results for {len(shard)} items")
        for idx, value in zip(shard, part):
            if not 0 <= idx < num_items:
                raise ValueError(f"rank {r}: item index {idx} out of range [0, {num_items})")
            if not seen[idx]:
                out[idx] = value
                seen[idx] = True
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise ValueError(f"gather: {len(missing)} item(s) have no result, first index {missing[0]}")
    return out


def interleave_gather(parts: Sequence[Sequence[Any]], num_items: int) -> list[Any]:
    """Reference ``collect_results_cpu`` for the expression scheme: round-robin over ranks, then
    truncate to N (drops the padding)."""
    out: list[Any] = []
    longest = max((len(p) for p in parts), default=0)
    for i in range(longest):
        for p in parts:
            if i < len(p):
                out.append(p[i])
    if len(out) < num_items:
        raise ValueError(f"interleave_gather: {len(out)} results for {num_items} items")
    return out[:num_items]
