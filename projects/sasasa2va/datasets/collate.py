"""Batch collation for the training DataLoader (spec model_training_reference §6.4).

Module-level function so it pickles into DataLoader workers. Images stay per-sample lists because
samples have different image counts (20 video images vs 1-13 tiles) and SAM2 frame counts.
"""
from __future__ import annotations

import numpy as np
import torch

from projects.sasasa2va.hf.models.templates import IGNORE_INDEX


def _as_tensor(x) -> torch.Tensor:
    """Masks as a tensor; lists of per-frame arrays/tensors are stacked."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, (list, tuple)):
        return torch.stack([_as_tensor(m) for m in x])
    raise ValueError(f"masks must be a tensor, an array or a list of them, got {type(x).__name__}")


def sasasa2va_collate_fn(instances, pad_index: int = 0) -> dict:
    """Per-sample dicts -> {'data': {...}, 'data_samples': None}.

    input_ids right-padded with ``pad_index`` (0, xtuner's default, not the tokenizer's pad id), labels
    with -100; bool attention_mask; position_ids = arange(max_len) per row (padding included, as the
    reference). pixel_values / masks: lists of per-sample tensors; g_pixel_values: flat list of SAM2
    frames (a sample's list is extended, a single tensor appended); frames_per_batch: SAM2 frames per
    sample. Image keys are absent when no sample has them.
    """
    instances = list(instances)
    if not instances:
        raise ValueError("sasasa2va_collate_fn: empty batch")
    lengths = [len(inst["input_ids"]) for inst in instances]
    for k, inst in enumerate(instances):
        if len(inst["labels"]) != lengths[k]:
            raise ValueError(f"sample {k}: {len(inst['labels'])} labels for {lengths[k]} input_ids")
    max_len = max(lengths)
    bsz = len(instances)
    input_ids = torch.full((bsz, max_len), int(pad_index), dtype=torch.long)
    labels = torch.full((bsz, max_len), IGNORE_INDEX, dtype=torch.long)
    for k, inst in enumerate(instances):
        input_ids[k, :lengths[k]] = torch.as_tensor(inst["input_ids"], dtype=torch.long)
        labels[k, :lengths[k]] = torch.as_tensor(inst["labels"], dtype=torch.long)
    positions = torch.arange(max_len)
    data = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": positions[None, :] < torch.as_tensor(lengths)[:, None],
        "position_ids": positions[None, :].repeat(bsz, 1),
    }
    if any(inst.get("pixel_values") is not None for inst in instances):
        data["pixel_values"] = [inst["pixel_values"] for inst in instances if inst.get("pixel_values") is not None]
    if any(inst.get("g_pixel_values") is not None for inst in instances):
        g_pixel_values, frames_per_batch = [], []
        for inst in instances:
            g = inst.get("g_pixel_values")
            if g is None:
                continue
            if isinstance(g, (list, tuple)):
                g_pixel_values.extend(g)
                frames_per_batch.append(len(g))
            else:
                g_pixel_values.append(g)
                frames_per_batch.append(1)
        data["g_pixel_values"] = g_pixel_values
        data["frames_per_batch"] = frames_per_batch
    if any(inst.get("masks") is not None for inst in instances):
        data["masks"] = [_as_tensor(inst["masks"]) for inst in instances if inst.get("masks") is not None]
    return {"data": data, "data_samples": None}
