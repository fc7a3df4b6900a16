#!/usr/bin/env python
"""Segment the object a sentence refers to in your own video, with one command.

    python tools/demo.py --model HF_DIR --video clip.mp4 --text "the dog that jumps" --out dog.gif
    python tools/demo.py --model HF_DIR --video frames_dir/ --text "the red car" --mode wrap_around \\
        --out car.gif --save-masks

``--video``: a video file OpenCV can decode (mp4, avi, ...; every ``--video-step``-th frame is kept) or
a folder of frames (jpg/jpeg/png/bmp/webp, sorted by name, all the same size). ``--mode``: one of the
five frame-sampling modes; q_frame needs the 100 selected frame indices (``--selected-fids``, a JSON
list or a file holding one). Writes the overlay GIF (prediction tinted and outlined on every frame) and
with ``--save-masks`` one 0/255 PNG per frame into ``--masks-dir`` (default: OUT without its suffix +
'_masks/'). Prints the model's answer and how many frames have a non-empty mask.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MODES = ("uniform", "uniform_plus", "q_frame", "wrap_around", "wrap_around_plus")
NUM_SAMPLED_FRAMES = 100  # frames the model samples per video (spec: 10 clips of 10)
MASKS_MANIFEST = ".demo_masks.json"  # the masks a run wrote into --masks-dir (a rerun may replace them)

from projects.sasasa2va.evaluation.inference_flags import add_inference_flags, predict_options  # noqa: E402
from projects.sasasa2va.utils.cli import (  # noqa: E402
    device_problem,
    output_dir_problem,
    output_file_problem,
    positive_int,
    resolve_device,
    run_reporting_user_errors,
)


def load_video(path: str, step: int = 1) -> tuple[list, list[str]]:
    """(RGB PIL frames, frame names) from a video file or a folder of frames; ValueError if unusable."""
    from PIL import Image

    if step < 1:
        raise ValueError(f"--video-step must be >= 1, got {step}")
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"{path}: no frames ({', '.join(FRAME_SUFFIXES)}) in this folder")
        names = names[::step]
        frames = []
        for name in names:
            try:
                with Image.open(os.path.join(path, name)) as im:
                    frames.append(im.convert("RGB"))
            except Exception as exc:  # PIL raises several types for broken files
                raise ValueError(f"{os.path.join(path, name)}: cannot read this frame ({exc})") from None
        sizes = {f.size for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"{path}: frames have different sizes {sorted(sizes)}; expected one size")
        return frames, [os.path.splitext(n)[0] for n in names]
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such video file or frame folder")
    from projects.sasasa2va.datasets.errors import DataError
    from projects.sasasa2va.datasets.readers import decode_video_frames

    try:
        arrays = decode_video_frames(path, step=step)
    except DataError as exc:
        raise ValueError(str(exc)) from None
    return [Image.fromarray(a) for a in arrays], [f"{i * step:05d}" for i in range(len(arrays))]


def parse_selected_fids(value: str | None, num_frames: int) -> list[int] | None:
    """A JSON list (inline or in a file) of frame indices, each in [0, num_frames)."""
    if value is None:
        return None
    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif not value.lstrip().startswith("["):  # not an inline list: the name of a file that is not there
        raise ValueError(f"--selected-fids {value}: no such file (give a JSON list of frame indices, or a file "
                         f"holding one)")
    try:
        fids = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--selected-fids: expected a JSON list of frame indices (or a file with one): {exc}") from None
    if not isinstance(fids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in fids):
        raise ValueError("--selected-fids: expected a JSON list of integers")
    bad = [i for i in fids if not 0 <= i < num_frames]
    if bad:
        raise ValueError(f"--selected-fids: indices {bad[:5]} outside the video's {num_frames} frames")
    if len(fids) != NUM_SAMPLED_FRAMES:
        raise ValueError(f"--selected-fids: expected {NUM_SAMPLED_FRAMES} frame indices (q_frame's list, repeats "
                         f"allowed), got {len(fids)}")
    return fids


def prepare_masks_dir(masks_dir: str, video: str, names: list[str]) -> list[str]:
    """Check --masks-dir before the model runs; returns the earlier demo masks it holds (listed in its
    MASKS_MANIFEST, or named like this run's frames or NNNNN.png), which this run replaces. Refused: a
    file, the input frame folder itself, a folder with other files."""
    problem = output_dir_problem(masks_dir, "--masks-dir")  # a file, or under one
    if problem:
        raise ValueError(problem)
    target, source = os.path.realpath(masks_dir), os.path.realpath(video)
    if os.path.isdir(source) and target == source:
        raise ValueError(f"--masks-dir {masks_dir}: is the input frame folder; the masks would overwrite the frames")
    if not os.path.isdir(masks_dir):
        return []
    present = sorted(n for n in os.listdir(masks_dir) if n != MASKS_MANIFEST)
    mine = {n + ".png" for n in names}
    try:
        with open(os.path.join(masks_dir, MASKS_MANIFEST), "r", encoding="utf-8") as f:
            mine |= set(json.load(f).get("masks", []))
    except (OSError, ValueError, AttributeError):
        pass  # no (readable) manifest: only the names above count as earlier masks
    ours = [n for n in present if n in mine or (n.endswith(".png") and n[:-4].isdigit())]
    others = [n for n in present if n not in ours]
    if others:
        raise ValueError(f"--masks-dir {masks_dir}: holds other files ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); give an empty or new folder")
    return [os.path.join(masks_dir, n) for n in ours]


def load_model(hf_dir: str, device: str, dtype: str, remote_code: bool):
    """(model, tokenizer) in eval mode on ``device``: the evaluation runner's own loading."""
    from projects.sasasa2va.evaluation.distributed import DistContext
    from projects.sasasa2va.evaluation.model_loading import load_model as runner_load_model
    from projects.sasasa2va.evaluation.runner import EvalOptions

    # (its check_hf_dir raises FileNotFoundError / ValueError for a folder that is not an export)
    return runner_load_model(EvalOptions(hf_dir=hf_dir, remote_code=remote_code, dtype=dtype),
                             DistContext(device=device))


def write_outputs(frames, names, masks, out_gif: str, text: str, masks_dir: str | None, fps: float,
                  max_side: int, stale_masks=()) -> None:
    import numpy as np

    from projects.sasasa2va.evaluation.submission import encode_png
    from projects.sasasa2va.evaluation.visualize import compose_frame, write_gif
    from projects.sasasa2va.utils.io import atomic_write_bytes, atomic_write_json

    total = len(frames)
    panels = [compose_frame(np.asarray(f), m, None, max_side=max_side, caption=f"{t + 1}/{total} {text}"[:60],
                            progress=(t + 1) / total) for t, (f, m) in enumerate(zip(frames, masks))]
    os.makedirs(os.path.dirname(os.path.abspath(out_gif)), exist_ok=True)
    write_gif(panels, out_gif, fps=fps)
    if masks_dir:
        os.makedirs(masks_dir, exist_ok=True)
        for stale in set(stale_masks or ()) - {os.path.join(masks_dir, n + ".png") for n in names}:
            os.remove(stale)  # an earlier run's masks of frames this run does not have (e.g. another --video-step)
        for name, m in zip(names, masks):
            atomic_write_bytes(os.path.join(masks_dir, name + ".png"), encode_png(m))
        atomic_write_json(os.path.join(masks_dir, MASKS_MANIFEST), {"masks": [n + ".png" for n in names]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HF folder (convert_to_hf.py --save-path)")
    p.add_argument("--video", required=True, help="video file or folder of frames")
    p.add_argument("--text", required=True, help="the referring expression")
    p.add_argument("--mode", default="uniform", choices=MODES, help="frame-sampling mode (default: uniform)")
    p.add_argument("--out", required=True, help="output GIF path")
    p.add_argument("--save-masks", action="store_true", help="also write one 0/255 PNG mask per frame")
    p.add_argument("--masks-dir", default=None, help="where --save-masks writes (default: OUT minus suffix + _masks)")
    p.add_argument("--selected-fids", default=None, help="q_frame: JSON list of 100 frame indices, or a file")
    p.add_argument("--video-step", type=int, default=1, help="keep every N-th frame (default: 1)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="model dtype; auto = bf16 on CUDA, float32 on CPU (default: auto)")
    p.add_argument("--no-remote-code", action="store_true",
                   help="load with this repository's classes instead of the folder's modeling code (by default "
                        "the folder's *.py files run: use folders you exported or reviewed)")
    p.add_argument("--max-new-tokens", type=positive_int, default=2048, help="answer length limit (default: 2048)")
    p.add_argument("--fps", type=float, default=8.0, help="GIF frame rate (default: 8)")
    p.add_argument("--max-side", type=int, default=480, help="GIF frame size limit (default: 480 px)")
    add_inference_flags(p)
    args = p.parse_args(argv)
    if not args.text.strip():
        p.error("--text is empty; give the sentence that refers to the object")
    if not args.out.lower().endswith(".gif"):
        p.error(f"--out {args.out!r}: expected a .gif path")
    problem = output_file_problem(args.out, "--out") or device_problem(args.device)
    if problem:
        p.error(problem)
    if not args.fps > 0 or args.max_side < 16:  # (not "<= 0": NaN too)
        p.error("--fps must be > 0 and --max-side >= 16")
    try:
        frames, names = load_video(args.video, args.video_step)
        fids = parse_selected_fids(args.selected_fids, len(frames))
    except (ValueError, OSError) as exc:
        p.error(str(exc))
    if args.mode == "q_frame" and fids is None:
        p.error("--mode q_frame needs --selected-fids (the 100 frame indices chosen for this expression)")
    try:
        options = predict_options(args)
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    if args.masks_dir and not args.save_masks:
        p.error("--masks-dir is where --save-masks writes; add --save-masks")
    masks_dir = (args.masks_dir or os.path.splitext(args.out)[0] + "_masks") if args.save_masks else None
    try:
        stale_masks = prepare_masks_dir(masks_dir, args.video, names) if masks_dir else []
    except ValueError as exc:
        p.error(str(exc))
    return run_reporting_user_errors(segment, args, frames, names, fids, options, masks_dir, stale_masks)


def segment(args, frames, names, fids, options, masks_dir, stale_masks) -> None:
    """Load the model, segment the video, write the outputs (main checked every option first)."""
    from projects.sasasa2va.hf.models.templates import eval_prompt

    device = resolve_device(args.device)
    t0 = time.time()
    model, tokenizer = load_model(args.model, device, args.dtype, not args.no_remote_code)
    print(f"[demo] model {args.model} on {device}; video {args.video}: {len(frames)} frames "
          f"{frames[0].size[0]}x{frames[0].size[1]}; mode {args.mode}", flush=True)
    out = model.predict_forward(video=frames, text=eval_prompt(args.text), tokenizer=tokenizer, mode=args.mode,
                                selected_fids=fids, max_new_tokens=args.max_new_tokens, **options)
    masks = out["prediction_masks"][0]
    write_outputs(frames, names, masks, args.out, args.text, masks_dir, args.fps, args.max_side, stale_masks)
    nonempty = int(sum(bool(m.any()) for m in masks))
    print(f"[demo] answer: {out['prediction']!r} (status {out['status']}, {out['num_seg']} [SEG])", flush=True)
    print(f"[demo] {nonempty}/{len(masks)} frames with a non-empty mask; GIF {args.out}"
          + (f"; masks {masks_dir}/" if masks_dir else "") + f" ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
