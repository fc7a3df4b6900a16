#!/usr/bin/env python
"""Write tiny random-init checkpoints in the official layouts (InternVL folder, SAM2 .pt, Sa2VA .pth).

    python tools/make_tiny_pretrained.py --out pretrained/tiny [--config CONFIG] [--arch qwen2]
        [--image-size 56] [--seed 0] [--sam2-hidden-dim 128]

Unset options take the config's ``auto_prepare.tiny_pretrained`` values (default config: the tiny one,
image size 56, SAM2 width 128), so the checkpoints fit it. The tiny config then fine-tunes a
stand-in-pretrained version of the Sa2VA .pth (tools/pretrain_tiny.py).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from projects.sasasa2va.models.tiny import ARCHS, make_tiny_pretrained  # noqa: E402
from projects.sasasa2va.utils.cli import output_dir_problem  # noqa: E402

TINY_CONFIG = "projects/sasasa2va/configs/sasasa2va_tiny.py"


def config_defaults(config_path: str) -> dict:
    """The config's ``auto_prepare.tiny_pretrained`` settings (``out_dir`` aside), each checked: a bad
    value is named with the config file and key, not met later as a traceback."""
    from projects.sasasa2va.utils.tool_inputs import config_section, load_tool_config

    key = "auto_prepare.tiny_pretrained"
    spec = dict(config_section(load_tool_config(config_path), key, config_path))
    if not spec:
        raise ValueError(f"--config {config_path}: no {key} entry to take the settings from")
    spec.pop("out_dir", None)
    for name in ("image_size", "seed", "sam2_hidden_dim"):
        if spec.get(name) is not None:
            try:
                spec[name] = int(spec[name])
            except (TypeError, ValueError):
                raise ValueError(f"{config_path}: {key}.{name} = {spec[name]!r}: expected an integer") from None
    if "arch" in spec and spec["arch"] not in ARCHS:
        raise ValueError(f"{config_path}: {key}.arch = {spec['arch']!r}: expected one of {sorted(ARCHS)}")
    return spec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="pretrained/tiny", help="output folder (default: pretrained/tiny)")
    parser.add_argument("--config", default=None,
                        help=f"config whose auto_prepare.tiny_pretrained gives the defaults below (default: {TINY_CONFIG})")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS), help="LLM architecture (default: the config's)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="ViT input size, a multiple of 28 (default: the config's; tiny: 56)")
    parser.add_argument("--seed", type=int, default=None, help="init seed (default: the config's; tiny: 0)")
    parser.add_argument("--sam2-hidden-dim", type=int, default=None,
                        help="width of the tiny SAM2, a multiple of 8 (default: the config's; tiny: 128)")
    parser.add_argument("--no-sa2va-pth", action="store_true", help="skip the Sa2VA-style .pth")
    parser.add_argument("--force", action="store_true",
                        help="replace existing tiny checkpoints in --out (and with them the stand-in pretraining)")
    args = parser.parse_args(argv)
    try:
        spec = config_defaults(args.config or os.path.join(ROOT, TINY_CONFIG))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    arch = args.arch or spec.get("arch", "qwen2")
    image_size = args.image_size if args.image_size is not None else spec.get("image_size", 112)
    seed = args.seed if args.seed is not None else spec.get("seed", 0)
    sam2_hidden_dim = args.sam2_hidden_dim if args.sam2_hidden_dim is not None else spec.get("sam2_hidden_dim")
    if image_size <= 0 or image_size % 28:
        parser.error(f"--image-size {image_size}: must be a positive multiple of 28 (patch 14, pixel shuffle 0.5)")
    if sam2_hidden_dim is not None and (sam2_hidden_dim < 8 or sam2_hidden_dim % 8):
        parser.error(f"--sam2-hidden-dim {sam2_hidden_dim}: must be a positive multiple of 8 (8 decoder heads)")
    if seed < 0:
        parser.error(f"--seed {seed}: must be >= 0 (as in tools/make_synthetic_data.py)")
    problem = output_dir_problem(args.out, "--out")
    if problem:
        parser.error(problem)
    manifest = os.path.join(args.out, "tiny_manifest.json")
    if os.path.exists(manifest) and not args.force:
        parser.error(f"{args.out} already holds tiny checkpoints ({manifest}); replacing them also discards the "
                     f"stand-in pretraining of tools/pretrain_tiny.py -- pass --force to do so")
    print(f"tiny checkpoints: arch {arch}, image size {image_size}, seed {seed}, SAM2 width "
          f"{sam2_hidden_dim or 'preset (64)'} -> {args.out}", flush=True)
    paths = make_tiny_pretrained(
        args.out, arch=arch, image_size=image_size, seed=seed, with_sa2va_pth=not args.no_sa2va_pth,
        sam2_hidden_dim=sam2_hidden_dim,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
