"""Concatenation of the training datasets with per-dataset repeats (spec model_training §5,
model_training_reference §6.2-6.3).

Sampler lengths (documented choice, 'improve'): xtuner's LengthGroupedSampler concatenates each
sub-dataset's ``modality_length``. The reference's video datasets reported ``real_len`` entries
(no repeats), so the sampler only ever drew indices below the sum of those lengths and the tail of the
mix (mostly Ref-SAV) was never trained on. Our datasets report ``len(self)`` entries, so the sampler
sees the configured repeats and the effective mixture equals the configured one.
"""
from __future__ import annotations

from torch.utils.data import ConcatDataset

from .refvos import build_object


class ConcatDatasetWithRepeats(ConcatDataset):
    """torch ConcatDataset over built datasets or config dicts; logs name / len / real_len of each."""

    def __init__(self, datasets):
        built = [build_object(d) for d in datasets]
        if not built:
            raise ValueError("ConcatDatasetWithRepeats: expected at least one dataset")
        super().__init__(built)
        from mmengine.logging import print_log  # the training log (mmengine), not the root logger

        for d in built:
            real = d.real_len() if callable(getattr(d, "real_len", None)) else len(d)
            print_log(f"dataset {getattr(d, 'name', type(d).__name__)}: len={len(d)} real_len={real} "
                      f"repeats={getattr(d, 'repeats', 1)}", logger="current")
        print_log(f"concatenated training set: {len(self)} items from {len(built)} datasets", logger="current")

    @property
    def modality_length(self) -> list[int]:
        """Concatenation of the sub-datasets' per-item lengths; one entry per item of the concat."""
        out: list[int] = []
        for d in self.datasets:
            lengths = list(getattr(d, "modality_length"))
            if len(lengths) != len(d):
                raise ValueError(f"{getattr(d, 'name', type(d).__name__)}: modality_length has {len(lengths)} "
                                 f"entries for {len(d)} items; the sampler would skip or misindex items")
            out.extend(lengths)
        return out
