"""In-memory records shared by training, evaluation and metrics (contract in docs/DESIGN.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Expression:
    """One referring expression; ``anno_ids`` are strings because mask_dict keys are strings."""

    exp_id: str
    text: str
    obj_ids: list[int] = field(default_factory=list)
    anno_ids: list[str] = field(default_factory=list)


@dataclass
class VideoRecord:
    """One video: sorted frame stems and its expressions (exp ids sorted as strings, like the reference)."""

    video_id: str
    frame_names: list[str]
    frame_dir: str
    expressions: dict[str, Expression] = field(default_factory=dict)

    def frame_path(self, i: int) -> str:
        return os.path.join(self.frame_dir, self.frame_names[i] + ".jpg")

    @property
    def num_frames(self) -> int:
        return len(self.frame_names)
