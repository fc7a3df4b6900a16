"""Image referring segmentation (RefCOCO / RefCOCO+ / RefCOCOg) for the training mix, equivalent to the
reference's Sa2VA01RefSeg (spec model_training_reference §5.5).

One item = one image with all its train refs; a sample asks about ``num_objects`` refs (with replacement,
faithful), each answered with one [SEG]. The sentence of each ref is drawn once at load (seeded), as the
reference's text_mode='random'. Images use InternVL dynamic tiling; SAM2 gets the whole image.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from projects.sasasa2va.hf.models.preprocessing import (
    _closest_grid, _tile_grids, dynamic_preprocess, mllm_transform, sam2_resize)
from projects.sasasa2va.hf.models.templates import image_token_string

from .errors import DataError
from .readers import annotation_mask, read_refcoco
from .refvos import RefTrainingDataset


def clean_phrase(text: str) -> str:
    """Lowercase and drop one trailing '.', as the reference does for RefCOCO sentences."""
    text = text.lower()
    return text[:-1] if text.endswith(".") else text


def load_image(path: str) -> Image.Image:
    """Fully decoded RGB image; missing/corrupt files raise DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc


class SaSaSa2VARefSeg(RefTrainingDataset):
    """RefCOCO-style image samples: ``pixel_values`` tiles(+thumbnail), one uint8 SAM2 image, masks [O,H,W]."""

    def __init__(self, data_root: str, refs_file: str = "refs(unc).p", split: str = "train", tokenizer=None,
                 template_name: str = "phi3_chat", special_tokens: Sequence[str] | None = None,
                 num_objects: int = 5, image_size: int = 448, tokens_per_image: int = 256,
                 min_dynamic_patch: int = 1, max_dynamic_patch: int = 12, use_thumbnail: bool = True,
                 sam2_image_size: int = 1024, max_length: int = 12288, repeats: float = 1,
                 max_bad_fraction: float = 0.05, bad_check_min_samples: int = 50,
                 sample_without_replacement: bool = False, seed: int | None = 0, name: str | None = None):
        if tokenizer is None:
            raise ValueError("SaSaSa2VARefSeg needs a tokenizer (object or config dict)")
        if not 1 <= min_dynamic_patch <= max_dynamic_patch:
            raise ValueError(f"need 1 <= min_dynamic_patch <= max_dynamic_patch, got "
                             f"{min_dynamic_patch}, {max_dynamic_patch}")
        super().__init__(tokenizer=tokenizer, template_name=template_name, special_tokens=special_tokens,
                         num_objects=num_objects, max_length=max_length, repeats=repeats,
                         max_bad_fraction=max_bad_fraction, bad_check_min_samples=bad_check_min_samples,
                         sample_without_replacement=sample_without_replacement, seed=seed,
                         name=name or f"refseg:{os.path.basename(os.path.normpath(data_root))}")
        self.data_root = data_root
        self.refs_file = refs_file
        self.image_size = int(image_size)
        self.tokens_per_image = int(tokens_per_image)
        self.min_dynamic_patch = int(min_dynamic_patch)
        self.max_dynamic_patch = int(max_dynamic_patch)
        self.use_thumbnail = bool(use_thumbnail)
        self.sam2_image_size = int(sam2_image_size)
        self.items = read_refcoco(data_root, refs_file, split)
        # one sentence per ref, fixed at load (reference text_mode='random'); seeded for reproducibility
        rng = np.random.default_rng([self.seed, 104729])
        self.phrases = [[clean_phrase(inst.sentences[int(rng.integers(len(inst.sentences)))])
                         for inst in img.instances] for img in self.items]
        self._num_items = len(self.items)
        self._finish_init()

    def _describe(self, j: int) -> str:
        return self.items[j].image_path

    def _num_tiles(self, width: int, height: int) -> int:
        """Tile count of dynamic_preprocess from the image size alone (no decode needed)."""
        cols, rows = _closest_grid(width / height, _tile_grids(self.min_dynamic_patch, self.max_dynamic_patch),
                                   width, height, self.image_size)
        n = cols * rows
        return n + 1 if self.use_thumbnail and n != 1 else n

    def _length_estimate(self, j: int) -> int:
        img = self.items[j]
        return self._num_tiles(img.width, img.height) * self.tokens_per_image + 2 + 30 * self.num_objects

    def _prepare(self, j: int, rng: np.random.Generator) -> dict:
        img = self.items[j]
        chosen = self._choose(len(img.instances), rng)
        pil = load_image(img.image_path)
        if pil.size != (img.width, img.height):
            raise DataError(f"{img.image_path}: image is {pil.size[0]}x{pil.size[1]} but instances.json says "
                            f"{img.width}x{img.height} (W x H); masks would not align")
        mask_cache: dict[int, np.ndarray] = {}
        for k in chosen:
            if k not in mask_cache:
                inst = img.instances[k]
                mask_cache[k] = annotation_mask(inst.segmentation, img.height, img.width,
                                                where=f"{self.data_root}: ann_id {inst.ann_id}")
        masks = torch.from_numpy(np.stack([mask_cache[k] for k in chosen]).astype(bool).astype(np.uint8))
        tiles = dynamic_preprocess(pil, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size,
                                   self.use_thumbnail)
        pixel_values = torch.stack([mllm_transform(t, self.image_size) for t in tiles])
        num_image_tokens = len(tiles) * self.tokens_per_image
        image_str = image_token_string(1, num_image_tokens)  # one block for all tiles (image samples)
        where = f"{img.image_path}: refs {[img.instances[k].ref_id for k in chosen]}"
        input_ids, labels = self._encode([self.phrases[j][k] for k in chosen], rng, None, image_str,
                                         num_image_tokens, where, verbatim_question_mark=False,
                                         lowercase=False, remove_periods=False)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "g_pixel_values": sam2_resize(pil, self.sam2_image_size),
            "masks": masks,
            "frames_per_batch": 1,
            "num_image_tokens": num_image_tokens,
            "type": "image",
            "sample_info": {"dataset": self.name, "index": j, "image_id": img.image_id,
                            "ref_ids": [img.instances[k].ref_id for k in chosen]},
        }
