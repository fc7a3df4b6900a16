#!/usr/bin/env python
"""Write tiny random-init checkpoints in the official layouts (InternVL folder, SAM2 .pt, Sa2VA .pth).

    python tools/make_tiny_pretrained.py --out pretrained/tiny [--arch qwen2] [--image-size 112] [--seed 0]
        [--sam2-hidden-dim 128]

The tiny config then fine-tunes a stand-in-pretrained version of the Sa2VA .pth (tools/pretrain_tiny.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from projects.sasasa2va.models.tiny import ARCHS, make_tiny_pretrained  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="pretrained/tiny", help="output folder (default: pretrained/tiny)")
    parser.add_argument("--arch", default="qwen2", choices=sorted(ARCHS), help="LLM architecture")
    parser.add_argument("--image-size", type=int, default=112, help="ViT input size, a multiple of 28")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sam2-hidden-dim", type=int, default=None,
                        help="width of the tiny SAM2 (default: the preset's 64; the tiny config uses 128)")
    parser.add_argument("--no-sa2va-pth", action="store_true", help="skip the Sa2VA-style .pth")
    args = parser.parse_args(argv)
    if args.image_size % 28:
        parser.error("--image-size must be a multiple of 28 (patch 14, pixel shuffle 0.5)")
    if args.sam2_hidden_dim is not None and (args.sam2_hidden_dim < 8 or args.sam2_hidden_dim % 8):
        parser.error("--sam2-hidden-dim must be a positive multiple of 8 (8 decoder heads)")
    paths = make_tiny_pretrained(
        args.out, arch=args.arch, image_size=args.image_size, seed=args.seed, with_sa2va_pth=not args.no_sa2va_pth,
        sam2_hidden_dim=args.sam2_hidden_dim,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
