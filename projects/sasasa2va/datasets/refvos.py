"""KFC training dataset for referring video segmentation (spec model_training §4-5,
model_training_reference §4-6): MeViS / ReVOS ('default'), Ref-YouTube-VOS ('refytvos'), Ref-SAV ('refsav').

One item = one video: ``num_objects`` expressions (with replacement, faithful), ``num_clips`` clips of
one key frame + a ``grid_size`` x ``grid_size`` grid, one conversation turn per expression answered with
``num_clips`` [SEG]. The shared machinery (repeats mapping, bad-sample policy, tokenizer set-up,
conversation checks) lives in :class:`RefTrainingDataset` so the image dataset (refseg.py) behaves the same.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from projects.sasasa2va.hf.models.frame_sampling import split_clips, training_indices
from projects.sasasa2va.hf.models.preprocessing import kfc_mllm_images, sam2_resize
from projects.sasasa2va.hf.models.templates import (
    IMG_CONTEXT_TOKEN, SPECIAL_TOKENS, get_template, image_token_string)

from .conversation import build_turns, encode_conversation, seg_token_id
from .errors import DataError
from .readers import (
    check_same_frame_size, expression_masks, load_frame, load_mask_dict, load_refsav_sample, read_meta_expressions,
    read_refsav, read_refytvos)

logger = logging.getLogger(__name__)

DATASET_TYPES = ("default", "refytvos", "refsav")
BAD_SAMPLE_ERRORS = (ValueError, OSError)  # DataError is a ValueError; bugs (TypeError, KeyError...) propagate


# --------------------------------------------------------------------------------------------------
# config helpers
def _short_path(path: str) -> str:
    """Last two path components, enough to tell MeViS from ReVOS in logs."""
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------------------------------
def build_object(obj: Any) -> Any:
    """An object, or a config dict with ``type`` (a callable, or a registry name for xtuner's BUILDER).

    Configs pass ``dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=...)`` or
    whole dataset configs; built objects pass through unchanged.
    """
    if not isinstance(obj, dict):  # mmengine ConfigDict is a dict subclass
        return obj
    cfg = dict(obj)
    if "type" not in cfg:
        raise ValueError(f"config dict has no 'type' key: {sorted(cfg)}")
    if isinstance(cfg["type"], str):
        from xtuner.registry import BUILDER  # only for string types; keeps import time low otherwise

        return BUILDER.build(obj)
    factory = cfg.pop("type")
    if not callable(factory):
        raise ValueError(f"config 'type' must be callable or a registry name, got {factory!r}")
    return factory(**cfg)


def prepare_tokenizer(tokenizer: Any, special_tokens: Sequence[str] | None) -> Any:
    """Build the tokenizer and add the special tokens in order (special_tokens=True), so ids match the model."""
    tok = build_object(tokenizer)
    tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if tokens:
        tok.add_tokens(tokens, special_tokens=True)
    ids = tok.encode(IMG_CONTEXT_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer encodes {IMG_CONTEXT_TOKEN!r} as {ids}; an InternVL tokenizer with "
                         f"<img>, </img>, {IMG_CONTEXT_TOKEN} as single tokens is required")
    seg_token_id(tok)  # clear error now rather than in every sample
    return tok


def repeat_index_map(real_len: int, repeats: float, seed: int) -> np.ndarray:
    """Item index -> real index for ``int(real_len * repeats)`` items, fixed at construction.

    Every real item appears floor(repeats) times plus once more for a seeded subset of the fractional
    remainder (repeats < 1: that subset only), so the repeated dataset is covered evenly. Built once
    in the main process, so all DataLoader workers share it (the reference rebuilt it per worker).
    """
    if repeats <= 0:
        raise ValueError(f"repeats must be > 0, got {repeats}")
    n = int(real_len * repeats)
    if real_len == 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 7919])
    full, rest = divmod(n, real_len)
    parts = [np.arange(real_len)] * full
    if rest:
        parts.append(rng.choice(real_len, rest, replace=False))
    return rng.permutation(np.concatenate(parts)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# shared base
# --------------------------------------------------------------------------------------------------
class RefTrainingDataset(Dataset):
    """Repeats, bad-sample policy and conversation encoding shared by the video and image datasets.

    Subclasses set ``self._num_items`` and implement ``_prepare(j, rng)``, ``_describe(j)`` and
    ``_length_estimate(j)``. Randomness per attempt comes from ``SeedSequence([seed, epoch, i, retry])``,
    so a sample does not depend on which worker loads it.

    Bad samples (any ValueError/OSError while loading, e.g. a corrupt frame or [SEG] cut by truncation)
    are logged with the sample and file, counted, and replaced by another seeded random item. Once at
    least ``bad_check_min_samples`` attempts were made and the bad fraction exceeds
    ``max_bad_fraction``, a DataError stops the run. Counters are per process (per DataLoader worker).
    """

    max_retries = 1000

    def __init__(self, *, tokenizer, template_name: str, special_tokens, num_objects: int, max_length: int,
                 repeats: float, max_bad_fraction: float, bad_check_min_samples: int,
                 sample_without_replacement: bool, seed: int | None, name: str):
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {num_objects}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        get_template(template_name)
        self.tokenizer = prepare_tokenizer(tokenizer, special_tokens)
        self.template_name = template_name
        self.num_objects = int(num_objects)
        self.max_length = int(max_length)
        self.repeats = float(repeats)
        self.max_bad_fraction = float(max_bad_fraction)
        self.bad_check_min_samples = int(bad_check_min_samples)
        self.sample_without_replacement = bool(sample_without_replacement)
        self.seed = int(np.random.SeedSequence().entropy % (2 ** 32)) if seed is None else int(seed)
        self.name = name
        self.epoch = 0
        self.seg_id = seg_token_id(self.tokenizer)
        self.img_context_id = int(self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
        self.num_attempts = 0
        self.num_bad = 0
        self._num_items = 0
        self._index_map: np.ndarray | None = None

    # -- sizes ---------------------------------------------------------------------------------
    def _finish_init(self) -> None:
        if self._num_items == 0:
            raise DataError(f"{self.name}: no usable items found")
        self._index_map = repeat_index_map(self._num_items, self.repeats, self.seed)

    def real_len(self) -> int:
        """Number of distinct items (videos / images) before repeats."""
        return self._num_items

    def __len__(self) -> int:
        return int(self._num_items * self.repeats)

    @property
    def modality_length(self) -> list[int]:
        """Positive token-length estimate per item, ``len(self)`` entries (with repeats).

        Improve vs the reference, whose video datasets reported ``real_len`` entries so the sampler never
        drew the tail of the concatenation; here the sampler sees every repeated item.
        """
        return [self._length_estimate(int(j)) for j in self._index_map]

    def set_epoch(self, epoch: int) -> None:
        """Vary the per-sample draws across epochs (set before workers are created)."""
        self.epoch = int(epoch)

    def bad_sample_stats(self) -> dict:
        return {"attempts": self.num_attempts, "bad": self.num_bad}

    # -- loading with the bad-sample policy -----------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: index {i} out of range for length {n}")
        j = int(self._index_map[i])
        for retry in range(self.max_retries + 1):
            rng = np.random.default_rng([self.seed, self.epoch, i, retry])
            self.num_attempts += 1
            try:
                return self._prepare(j, rng)
            except BAD_SAMPLE_ERRORS as exc:
                self.num_bad += 1
                logger.warning("%s: skipping bad sample %d (%s): %s [%d of %d samples skipped in this process]",
                               self.name, j, self._describe(j), exc, self.num_bad, self.num_attempts)
                self._check_bad_fraction(j, exc)
                j = int(rng.integers(self._num_items))
        raise DataError(f"{self.name}: {self.max_retries + 1} consecutive bad samples starting at item {i}")

    def _check_bad_fraction(self, j: int, exc: Exception) -> None:
        if self.num_attempts < self.bad_check_min_samples:
            return
        if self.num_bad > self.max_bad_fraction * self.num_attempts:
            raise DataError(
                f"{self.name}: {self.num_bad} of {self.num_attempts} samples were bad "
                f"({self.num_bad / self.num_attempts:.1%} > max_bad_fraction={self.max_bad_fraction:.1%}); "
                f"last one: item {j} ({self._describe(j)}): {exc}. Fix or remove the bad files, or raise "
                f"max_bad_fraction") from exc

    # -- conversation ---------------------------------------------------------------------------
    def _choose(self, n: int, rng: np.random.Generator) -> list[int]:
        """num_objects positions out of n; with replacement like the reference unless asked otherwise."""
        if n < 1:
            raise DataError(f"{self.name}: nothing to choose from")
        replace = not (self.sample_without_replacement and n >= self.num_objects)
        return [int(k) for k in rng.choice(n, self.num_objects, replace=replace)]

    def _encode(self, texts: list[str], rng, num_clips: int | None, image_str: str, num_image_tokens: int,
                where: str, **question_kwargs) -> tuple[list[int], list[int]]:
        """Turns -> (input_ids, labels); a sample whose [SEG] or image tokens were truncated is a DataError."""
        turns = build_turns(texts, rng, num_clips, image_str, **question_kwargs)
        enc = encode_conversation(self.tokenizer, self.template_name, turns, self.max_length)
        expected = self.num_objects * (1 if num_clips is None else num_clips)
        if enc.num_seg != expected:
            raise DataError(f"{where}: {enc.num_seg} [SEG] tokens after truncation to max_length="
                            f"{self.max_length}; expected {expected}")
        n_img = sum(1 for t in enc.input_ids if t == self.img_context_id)
        if n_img != num_image_tokens:
            raise DataError(f"{where}: {n_img} {IMG_CONTEXT_TOKEN} tokens after truncation to max_length="
                            f"{self.max_length}; expected {num_image_tokens}")
        return enc.input_ids, enc.labels

    # -- subclass hooks -------------------------------------------------------------------------
    def _prepare(self, j: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def _describe(self, j: int) -> str:
        return f"item {j}"

    def _length_estimate(self, j: int) -> int:
        return 100


# --------------------------------------------------------------------------------------------------
# the video dataset
# --------------------------------------------------------------------------------------------------
class SaSaSa2VARefVOS(RefTrainingDataset):
    """Key Frame Compression samples from MeViS/ReVOS ('default'), Ref-YouTube-VOS, Ref-SAV.

    ``image_folder``: frame root (<image_folder>/<video>/<frame>.jpg), or for 'refsav' the root the
    Ref-SAV.json paths are relative to. ``mask_file``: mask_dict.json / mask_dict.pkl (None for refsav).
    Sampled frames per video = num_clips * (grid_size**2 + 1); defaults reproduce the reference (100).
    """

    def __init__(self, image_folder: str, expression_file: str, mask_file: str | None = None,
                 dataset_type: str = "default", tokenizer=None, template_name: str = "phi3_chat",
                 special_tokens: Sequence[str] | None = None, num_objects: int = 5, num_clips: int = 10,
                 grid_size: int = 3, frame_strategy: str = "wrap_around", image_size: int = 448,
                 tokens_per_image: int = 256, sam2_image_size: int = 1024, max_length: int = 12288,
                 repeats: float = 1, max_bad_fraction: float = 0.05, bad_check_min_samples: int = 50,
                 sample_without_replacement: bool = False, seed: int | None = 0, name: str | None = None,
                 refsav_frame_step: int = 4):
        if dataset_type not in DATASET_TYPES:
            raise ValueError(f"unknown dataset_type {dataset_type!r}; expected one of {list(DATASET_TYPES)}")
        if tokenizer is None:
            raise ValueError("SaSaSa2VARefVOS needs a tokenizer (object or config dict)")
        if num_clips < 1 or grid_size < 1:
            raise ValueError(f"num_clips and grid_size must be >= 1, got {num_clips}, {grid_size}")
        if frame_strategy not in ("wrap_around", "uniform"):
            raise ValueError(f"unknown frame_strategy {frame_strategy!r}; expected 'wrap_around' or 'uniform'")
        if dataset_type != "refsav" and not mask_file:
            raise ValueError(f"dataset_type {dataset_type!r} needs mask_file")
        super().__init__(tokenizer=tokenizer, template_name=template_name, special_tokens=special_tokens,
                         num_objects=num_objects, max_length=max_length, repeats=repeats,
                         max_bad_fraction=max_bad_fraction, bad_check_min_samples=bad_check_min_samples,
                         sample_without_replacement=sample_without_replacement, seed=seed,
                         name=name or f"{dataset_type}:{_short_path(expression_file)}")
        self.image_folder = image_folder
        self.expression_file = expression_file
        self.mask_file = mask_file
        self.dataset_type = dataset_type
        self.num_clips = int(num_clips)
        self.grid_size = int(grid_size)
        self.num_sampled_frames = self.num_clips * (self.grid_size ** 2 + 1)
        self.frame_strategy = frame_strategy
        self.image_size = int(image_size)
        self.tokens_per_image = int(tokens_per_image)
        self.sam2_image_size = int(sam2_image_size)
        self.refsav_frame_step = int(refsav_frame_step)
        self.num_image_tokens = 2 * self.num_clips * self.tokens_per_image
        self._image_str = image_token_string(2 * self.num_clips, self.tokens_per_image)

        if dataset_type == "refsav":
            self.items: list = read_refsav(expression_file, image_folder)
            self.mask_dict = None
        else:
            if dataset_type == "refytvos":
                records, self.mask_dict = read_refytvos(expression_file, image_folder, mask_file)
            else:
                records = read_meta_expressions(expression_file, image_folder, require_anno_id=True)
                self.mask_dict = load_mask_dict(mask_file)
            self.items = [r for r in records.values() if r.expressions]
            if len(self.items) < len(records):
                logger.warning("%s: %d videos without expressions ignored", self.name,
                               len(records) - len(self.items))
        self._num_items = len(self.items)
        self._finish_init()

    # -- hooks ----------------------------------------------------------------------------------
    def _describe(self, j: int) -> str:
        item = self.items[j]
        if self.dataset_type == "refsav":
            return f"Ref-SAV entry {item.key!r}, {item.video_path}"
        return f"video {item.video_id!r} in {item.frame_dir}"

    def _length_estimate(self, j: int) -> int:
        """Visual tokens + block markers + ~30 text tokens per turn + ~6 per 'Clip_k [SEG],'."""
        blocks = 2 * self.num_clips
        return self.num_image_tokens + 3 * blocks + self.num_objects * (30 + 6 * self.num_clips)

    def _prepare(self, j: int, rng: np.random.Generator) -> dict:
        item = self.items[j]
        if self.dataset_type == "refsav":
            keys = list(item.objects)
            chosen = [keys[k] for k in self._choose(len(keys), rng)]
            frames_rgb, obj_masks = load_refsav_sample(item, obj_ids=sorted(set(chosen)),
                                                       step=self.refsav_frame_step)
            indices = training_indices(len(frames_rgb), self.num_sampled_frames, self.frame_strategy)
            uniq = sorted(set(indices))
            frames = [Image.fromarray(frames_rgb[f]) for f in uniq]
            key_idx = [c[0] for c in split_clips(indices, self.num_clips)]
            per_obj = [obj_masks[k][key_idx] for k in chosen]
            texts = [item.objects[k] for k in chosen]
            qkw = dict(verbatim_question_mark=False, lowercase=False, remove_periods=False)
            info = {"dataset": self.name, "index": j, "video_id": item.key, "exp_ids": chosen}
            where = f"{self.expression_file}: Ref-SAV entry {item.key!r} objects {chosen}"
        else:
            exp_ids = list(item.expressions)
            chosen = [exp_ids[k] for k in self._choose(len(exp_ids), rng)]
            indices = training_indices(item.num_frames, self.num_sampled_frames, self.frame_strategy)
            uniq = sorted(set(indices))
            frames = [load_frame(item, f) for f in uniq]
            check_same_frame_size(item, frames, uniq)
            key_idx = [c[0] for c in split_clips(indices, self.num_clips)]
            w, h = frames[0].size  # first sampled frame (indices are sorted, so uniq[0] == indices[0])
            cache: dict[str, np.ndarray] = {}
            for e in chosen:
                if e not in cache:
                    cache[e] = expression_masks(item, e, self.mask_dict, key_idx, frame_size_hw=(h, w))
            per_obj = [cache[e] for e in chosen]
            texts = [item.expressions[e].text for e in chosen]
            qkw = {}
            info = {"dataset": self.name, "index": j, "video_id": item.video_id, "exp_ids": chosen}
            where = f"{self.expression_file}: video {item.video_id!r} expressions {chosen}"
        return self._build(frames, uniq, indices, key_idx, per_obj, texts, qkw, rng, where, info)

    def _build(self, frames, uniq, indices, key_idx, per_obj, texts, qkw, rng, where, info) -> dict:
        """Images, masks and conversation of one sample from the decoded frames (positions in ``uniq``)."""
        pos = {f: k for k, f in enumerate(uniq)}
        local = [pos[f] for f in indices]
        pixel_values = kfc_mllm_images(frames, local, self.num_clips, self.grid_size, self.image_size)
        g_cache: dict[int, torch.Tensor] = {}
        for f in key_idx:
            if f not in g_cache:
                g_cache[f] = sam2_resize(frames[pos[f]], self.sam2_image_size)
        g_pixel_values = [g_cache[f] for f in key_idx]
        # object-major: row k * num_clips + t is object k on key frame t; binarised
        masks = torch.from_numpy(np.concatenate([np.asarray(m, dtype=bool) for m in per_obj]).astype(np.uint8))
        input_ids, labels = self._encode(texts, rng, self.num_clips, self._image_str, self.num_image_tokens,
                                         where, **qkw)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "g_pixel_values": g_pixel_values,
            "masks": masks,
            "frames_per_batch": self.num_clips,
            "num_image_tokens": self.num_image_tokens,
            "type": "video",
            "sample_info": info,
        }
