"""Named evaluation splits (spec evaluation.md §4.1, §6.1, decision §11.2).

Every split is a folder with ``JPEGImages/<video>/<frame>.jpg`` and a meta file
(``meta_expressions.json``; the MeViS test release uses ``meta_expressions_release.json``), optionally
``mask_dict.json`` (ground truth) and a Q-frame ``selected_frames.json`` that is only read in
``q_frame`` mode. Paths are relative to a data root (default ``<repo>/data``); the split folder and the
Q-frame file can each be overridden.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_DATA_ROOT = os.path.join(REPO_ROOT, "data")
QFRAME_SOURCE = "https://huggingface.co/datasets/QuanzhuNiu/MeViS-Qframe"


@dataclass(frozen=True)
class SplitSpec:
    """Table entry; paths relative to the data root. ``meta_names`` are tried in order."""

    name: str
    split_dir: str
    meta_names: tuple[str, ...] = ("meta_expressions.json",)
    mask_names: tuple[str, ...] = ()
    qframe_file: str | None = None
    description: str = ""


SPLITS: dict[str, SplitSpec] = {
    "MEVIS": SplitSpec("MEVIS", "video_datas/mevis/valid", qframe_file="mevis_q_frame/valid/selected_frames.json",
                       description="MeViS valid (GT hidden; score on the server)"),
    "MEVIS_U": SplitSpec("MEVIS_U", "video_datas/mevis/valid_u", mask_names=("mask_dict.json",),
                         qframe_file="mevis_q_frame/valid_u/selected_frames.json",
                         description="MeViS valid_u (GT released)"),
    "MEVIS_T": SplitSpec("MEVIS_T", "video_datas/mevis/test",
                         meta_names=("meta_expressions_release.json", "meta_expressions.json"),
                         qframe_file="mevis_q_frame/test/selected_frames.json",
                         description="MeViS test (challenge release)"),
    "SYN_MEVIS": SplitSpec("SYN_MEVIS", "synthetic/mevis/valid",
                           qframe_file="synthetic/mevis_q_frame/valid/selected_frames.json",
                           description="synthetic stand-in for MeViS valid"),
    "SYN_MEVIS_U": SplitSpec("SYN_MEVIS_U", "synthetic/mevis/valid_u", mask_names=("mask_dict.json",),
                             qframe_file="synthetic/mevis_q_frame/valid_u/selected_frames.json",
                             description="synthetic stand-in for MeViS valid_u (with GT)"),
}


@dataclass(frozen=True)
class ResolvedSplit:
    """Absolute, checked paths of one split. ``mask_file`` is None when the split has no GT file."""

    name: str
    split_dir: str
    image_folder: str
    meta_file: str
    mask_file: str | None
    qframe_file: str | None

    def load_records(self) -> dict:
        """{video_id: VideoRecord} in JSON order (datasets.readers.read_meta_expressions).

        Empty/whitespace expressions are kept (with a warning): the runner records them as failed
        expressions instead of refusing the whole split. Structural errors still raise DataError."""
        from projects.sasasa2va.datasets.readers import read_meta_expressions

        return read_meta_expressions(self.meta_file, self.image_folder, allow_empty_text=True)

    def load_qframe(self, records: dict, num_samples: int = 100) -> dict[str, dict[str, list[int]]]:
        """Q-frame indices for ``records`` (q_frame mode only); clear error when the file is absent."""
        from projects.sasasa2va.datasets.readers import read_selected_frames

        if not self.qframe_file:
            raise FileNotFoundError(f"split {self.name}: no Q-frame file known; pass --qframe-file "
                                    "path/to/selected_frames.json")
        if not os.path.isfile(self.qframe_file):
            raise FileNotFoundError(
                f"{self.qframe_file}: Q-frame selected_frames.json not found (needed by mode q_frame for split "
                f"{self.name}); download it from {QFRAME_SOURCE} or pass --qframe-file")
        return read_selected_frames(self.qframe_file, records, num_samples=num_samples)

    def require_mask(self) -> str:
        """The GT mask file, or FileNotFoundError (split without ground truth)."""
        if self.mask_file is None:
            raise FileNotFoundError(f"split {self.name} ({self.split_dir}): no ground-truth mask_dict.json")
        return self.mask_file


def split_names() -> list[str]:
    return list(SPLITS)


def get_spec(name: str) -> SplitSpec:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)} (or give --split-dir for "
                         "a custom split folder)")
    return SPLITS[name]


def resolve_split(name: str, data_root: str | None = None, split_dir: str | None = None,
                  qframe_file: str | None = None) -> ResolvedSplit:
    """Check and return the paths of split ``name``.

    ``split_dir`` replaces the table's folder (an unknown name is allowed then: a custom split with
    ``meta_expressions.json``); ``qframe_file`` replaces the Q-frame path, which is not checked here
    (only q_frame mode reads it).
    """
    root = os.path.abspath(data_root or DEFAULT_DATA_ROOT)
    if name in SPLITS:
        spec = SPLITS[name]
    elif split_dir:
        spec = SplitSpec(name, split_dir, mask_names=("mask_dict.json",))
    else:
        get_spec(name)  # raises with the list of known names
        raise AssertionError("unreachable")
    sdir = os.path.abspath(split_dir) if split_dir else os.path.join(root, spec.split_dir)
    if not os.path.isdir(sdir):
        hint = "" if split_dir else f" (data root {root}; override with --data-root or --split-dir)"
        raise FileNotFoundError(f"{sdir}: folder of split {name} not found{hint}")
    metas = [os.path.join(sdir, m) for m in spec.meta_names]
    meta = next((m for m in metas if os.path.isfile(m)), None)
    if meta is None:
        raise FileNotFoundError(f"split {name}: no meta file in {sdir} (looked for {', '.join(spec.meta_names)})")
    images = os.path.join(sdir, "JPEGImages")
    if not os.path.isdir(images):
        raise FileNotFoundError(f"{images}: frame folder of split {name} not found")
    mask = next((os.path.join(sdir, m) for m in spec.mask_names if os.path.isfile(os.path.join(sdir, m))), None)
    if qframe_file:
        qf = os.path.abspath(qframe_file)
    elif spec.qframe_file:
        qf = os.path.join(root, spec.qframe_file)
    else:
        qf = None
    return ResolvedSplit(name=name, split_dir=sdir, image_folder=images, meta_file=meta, mask_file=mask,
                         qframe_file=qf)
