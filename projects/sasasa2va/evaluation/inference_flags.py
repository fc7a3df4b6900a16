"""Command-line flags for the named inference options (spec evaluation.md §11.1: faithful by default,
the fixes as options) shared by ref_vos_eval.py and tools/demo.py."""
from __future__ import annotations

import argparse
import os

from projects.sasasa2va.hf.models.inference import PATH_B_AVERAGE, PROPAGATION, InferenceOptions


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inference options (spec evaluation.md §11.1; every default is the faithful "
                                  "reference behaviour)")
    g.add_argument("--q-frame-anchor-fix", action="store_true",
                   help="Q1: q_frame with more than 100 frames conditions SAM2 on the selected frames themselves "
                        "(frames before the first are tracked backward) instead of real frames 0..99")
    g.add_argument("--uncovered-fix", action="store_true",
                   help="Q3: q_frame with fewer than 100 frames decodes frames missing from the list with the "
                        "nearest copy's clip (faithful: empty mask)")
    g.add_argument("--path-b-average", choices=PATH_B_AVERAGE, default="logits",
                   help="Q4: Path B averages the copies' logits (faithful: one -1024 'no object' copy dominates) "
                        "or their probabilities (default: %(default)s)")
    g.add_argument("--propagation", choices=PROPAGATION, default="memory",
                   help="Path C (wrap_around / q_frame above 100 frames): 'memory' tracks with the fine-tuned "
                        "SAM2 (faithful), 'none' decodes every frame with its nearest clip's [SEG], "
                        "'memory_original_sam2' propagates the fine-tuned masks with the original SAM2 weights "
                        "of --sam2-original (Sa2VA-i) (default: %(default)s)")
    g.add_argument("--sam2-original", default=None, metavar="PT",
                   help="official SAM2 checkpoint (e.g. pretrained/sam2_hiera_large.pt) for "
                        "--propagation memory_original_sam2")


def predict_options(args: argparse.Namespace) -> dict:
    """The options that differ from the defaults, as predict_forward / predict_video keywords (so a run
    with default options records none, and resumes runs made before these flags existed). Raises
    ValueError (bad combination) or FileNotFoundError (missing --sam2-original) before any model loads."""
    path = os.path.abspath(args.sam2_original) if args.sam2_original else None
    chosen = {"q_frame_anchor_fix": bool(args.q_frame_anchor_fix), "uncovered_fix": bool(args.uncovered_fix),
              "path_b_average": args.path_b_average, "propagation": args.propagation,
              "sam2_original_checkpoint": path}
    if args.propagation == "memory_original_sam2" and path is None:
        raise ValueError("--propagation memory_original_sam2 needs --sam2-original PT (an official SAM2 "
                         "checkpoint, e.g. sam2_hiera_large.pt)")
    if args.propagation != "memory_original_sam2" and path is not None:
        raise ValueError(f"--sam2-original is only used with --propagation memory_original_sam2 "
                         f"(got --propagation {args.propagation})")
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"--sam2-original: SAM2 checkpoint not found: {path}")
    InferenceOptions(**chosen)  # any other check of the options themselves
    defaults = InferenceOptions()
    return {k: v for k, v in chosen.items() if v != getattr(defaults, k)}
