"""Per-video shared computation for inference: every expression and every mode of one video.

MeViS has ~10-20 expressions per video and the method runs five modes, but most of the work depends
only on the video or on the frame selection. A :class:`VideoContext` caches

(a) SAM2 features per frame (LRU under ``feature_budget_bytes``; evicted frames are recomputed),
(b) InternViT+mlp1 tokens per distinct MLLM image (key frame or grid, keyed by frame indices and size),
(c) prompt KV caches at a canonical split after the last ``</img>`` (everything but the question),
(d) whole generations (same tokens + same images -> same greedy answer; e.g. uniform and
    uniform_plus see the same 100 frames) and the combined low-res logits of identical decode plans,
(e) single (frame, [SEG]) decodes (LRU under ``pair_cache_bytes``), shared by the decode plans of
    one answer,

and counts the work done (:class:`WorkCounters`). ``predict_video`` first plans every answer the
video needs (each text x mode) and greedy-decodes the distinct ones in batches
(:meth:`VideoContext.prefetch_generations` -> ``model.generate_answers``); the per-(text, mode) loop
then finds them in (d).

Exactness: every computation is split into units that do not depend on what is cached — SAM2 encodes
frame blocks aligned to ``encode_batch``, each MLLM image goes through the ViT alone, the prompt is
prefilled in the same two chunks, and on CPU (``exact_rows``) batched greedy decoding and SAM2
decodes compute each row / pair as it would alone (:class:`RowExact`) — so a cache hit returns
bit-for-bit what a fresh :class:`VideoContext` would compute. ``naive=True`` turns every cache off and
recomputes everything for each (text, mode), as a baseline for benchmarks: all frames encoded per
call, one prompt decoded at a time, every decode call of the plan (100 virtual decodes in Path B).
With ``exact_rows`` it does so in the same units as the shared path (each image alone, the two prefill
chunks, RowExact decodes), so its probabilities are bit for bit the shared path's; otherwise (GPU) it
follows the reference's batching (20 images in one ViT batch, one-shot prefill).
"""
from __future__ import annotations

import contextlib
import logging
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .frame_sampling import (
    MODES,
    DecodePlan,
    combine_decoded_logits,
    decode_plan,
    long_index,
    seg_prompt_indices,
    select_indices,
    split_clips,
)
from .inference import (
    InferenceOptions,
    build_prompt_text,
    canonical_boundary,
    DEFAULT_DECODE_ATTENTION,
    check_decode_attention,
    eval_mode,
    empty_probs,
    logits_to_outputs,
    make_result,
    model_device,
    module_dtype,
    probs_format,
    seg_prompts,
    split_options,
    to_pil,
    token_id,
    tokenize_prompt,
    tokenize_prompt_split,
)
from .preprocessing import check_same_size, dynamic_preprocess, kfc_image, kfc_image_key, mllm_transform, sam2_resize
from .row_exact import RowExact
from .sam2_grounding import FrameFeatures, propagate_masks_with_memory
from .templates import IMG_END_TOKEN, get_template, image_token_string

logger = logging.getLogger(__name__)
DECODE_BATCH = 16  # (frame, [SEG]) pairs per SAM2 mask-decoder call on CPU (RowExact) and in the naive path
GPU_DECODE_BATCH = 64  # the same for the shared path on a GPU
PAIR_CACHE_BYTES = 256 << 20  # default bound of VideoContext's single-decode cache (1024 pairs at 256 px)
OUTPUT_CACHE_BYTES = 1 << 30  # default bound of VideoContext's full-size outputs cache (host memory)
CPU_DECODE_BATCH_KV_BYTES = 4 << 30  # default bound of a decode batch's KV caches on CPU
IMAGE_WORKERS = min(8, os.cpu_count() or 1)  # threads building a prompt's missing KFC images
VISION_BATCH = 16  # images per ViT call without exact_rows (GPU); with it, one at a time
IMAGE_LOOKAHEAD_PREFIXES = 2  # prompt prefixes whose images prefetch_generations builds ahead
ImageSpec = tuple  # (hashable key, zero-argument callable -> float pixels [3, S, S])
_IMAGE_POOLS: dict = {}
if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's worker threads
    os.register_at_fork(after_in_child=_IMAGE_POOLS.clear)


def image_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of ``workers`` KFC-image threads (created once: no thread start-up per prompt)."""
    pool = _IMAGE_POOLS.get(workers)
    if pool is None:
        pool = _IMAGE_POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kfc-images")
    return pool


def original_sam2_grounding(model, checkpoint: str):
    """``model``'s grounding encoder with the original SAM2 weights of ``checkpoint`` (Sa2VA-i
    propagation), loaded once per model and checkpoint and kept beside the model's modules (not one of
    them: never saved with it); moved again if the model moved to another device or dtype."""
    grounding = model.grounding_encoder
    ref = grounding.sam2_model.no_mem_embed
    key = os.path.abspath(checkpoint)
    held = model.__dict__.get("_original_sam2")
    if held is None or held[0] != key:
        held = (key, grounding.with_original_weights(checkpoint))
        model.__dict__["_original_sam2"] = held
    twin = held[1]
    twin_ref = twin.sam2_model.no_mem_embed
    if twin_ref.device != ref.device or twin_ref.dtype != ref.dtype:
        twin.to(device=ref.device, dtype=ref.dtype)
    return twin


def lru_get(cache: OrderedDict, key):
    """The cached value (now most recently used) or None."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def lru_put(cache: OrderedDict, key, value, limit: int) -> None:
    """Store ``value`` and drop the least recently used entries beyond ``limit``; limit 0 stores nothing."""
    if limit:
        cache[key] = value
        while len(cache) > limit:
            cache.popitem(last=False)


def default_decode_batch_kv_bytes(model, device: torch.device) -> int:
    """Half of what the model's weights leave of the GPU's total memory (at least 1 GiB): fixed for a
    model and GPU -- not what happens to be allocated or free -- so batches, hence results, do not
    depend on the videos before or on the number of processes. 4 GiB on CPU."""
    if device.type != "cuda":
        return CPU_DECODE_BATCH_KV_BYTES
    total = torch.cuda.get_device_properties(device).total_memory
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return max(1 << 30, (total - weights) // 2)


def kv_bytes_per_token(llm_config, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values over all layers of an HF decoder config (GQA-aware)."""
    heads = int(getattr(llm_config, "num_attention_heads"))
    kv_heads = int(getattr(llm_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(llm_config, "head_dim", None) or llm_config.hidden_size // heads)
    return 2 * int(llm_config.num_hidden_layers) * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class WorkCounters:
    """What a context actually computed (cache hits are counted separately)."""

    sam2_frames_encoded: int = 0      # frames through the SAM2 image encoder (recomputes included)
    mllm_images_encoded: int = 0      # images through InternViT + mlp1
    tokens_prefilled: int = 0         # prompt tokens run through the LLM
    tokens_decoded: int = 0           # generated tokens fed back through the LLM
    sam2_decodes: int = 0             # (frame, prompt) mask-decoder evaluations, conditioning frames included
    sam2_frames_tracked: int = 0      # frames tracked from memory (Path C)
    sam2_frames_encoded_original: int = 0  # frames encoded by the original SAM2 weights (Sa2VA-i Path C)
    prefix_tokens_reused: int = 0     # prompt tokens served from a cached prefix
    generations_reused: int = 0       # answers served from the generation cache
    logits_reused: int = 0            # decode plans served from the logits (or outputs) cache
    outputs_reused: int = 0           # full-size masks/probabilities served from the outputs cache
    sam2_features_evicted: int = 0    # frames dropped from the feature cache by the budget

    def as_dict(self) -> dict:
        return asdict(self)


class TokenKey(tuple):
    """A prompt's token ids as a cache key, hashed once: CPython does not cache tuple hashes, and these
    tuples hold thousands of ids that every generation, pair and logits lookup of a prediction re-hashed."""

    def __new__(cls, ids):
        key = super().__new__(cls, ids)
        key._hash = tuple.__hash__(key)
        return key

    def __hash__(self):
        return self._hash


class Generation(NamedTuple):
    key: tuple                        # (prompt ids, image keys, max_new_tokens)
    ids: torch.Tensor
    text: str
    seg_hidden_states: torch.Tensor


class VideoContext:
    """Shared state for running many (expression, mode) pairs on one video with one model.

    ``frames``: the video's frames (PIL images, or HxWx3 uint8 arrays), all the same size.
    ``feature_budget_bytes``: bound on cached SAM2 features (None = keep every frame); while a block
    of ``encode_batch`` frames is being used the cache may exceed it by that block.
    ``naive``: no caching at all (reference-style batching), for benchmarks.
    ``encode_batch`` / ``decode_batch``: SAM2 encoder / mask-decoder batch sizes (decode_batch None:
    ``DECODE_BATCH`` with ``exact_rows`` or ``naive``, else ``GPU_DECODE_BATCH``); ``max_prefix_caches``,
    ``max_cached_logits``, ``max_vision_images``: LRU sizes of the prompt-prefix KV caches, combined
    low-res logits and vision tokens (0 disables that cache). Answers are always kept (small).
    ``decode_batch_prompts``: most prompts greedy-decoded together by :meth:`prefetch_generations`
    (1 = one at a time). ``decode_batch_kv_bytes``: bound on a batch's KV memory (each row's cache
    plus the batch's distinct prefix caches, estimated from the LLM's shapes), which lowers the number
    of prompts per batch for long prompts or large LLMs; 0 = no bound; None (default) = half of what
    the model's weights leave of the GPU's total memory (fixed for a model and GPU, so batches and
    results are reproducible), 4 GiB on CPU. On a GPU a decoding step costs about the same for 10 or
    60 rows, so the more of a video's answers share a batch the less the evaluation grows with its
    expressions.
    ``exact_rows`` (default: on CPU): batched greedy decoding runs ``generate_answers(exact=True)``, so
    every answer is bit for bit the one-prompt answer; otherwise plain batched kernels (GPU), equal up
    to rounding.
    ``decode_attention``: "matmul" (default) or "sdpa", passed to ``generate_answers`` for the plain
    batched decoding steps (without ``exact_rows``; see there).
    ``pair_cache_bytes``: bound on the cached low-res logits of single (frame, [SEG]) decodes, reused
    across the decode plans of one answer (e.g. uniform's Path A and uniform_plus's Path B), so each
    distinct pair is decoded once, and :meth:`prefetch_decodes` batches across answers within it; 0
    disables both; None: 256 MiB. With ``exact_rows`` every decode runs
    under :class:`RowExact`, so a pair's logits do not depend on its chunk and a cached pair equals a
    fresh one (and the naive path's) bit for bit.
    ``output_cache_bytes``: bound on the cached full-size outputs (masks and probabilities, host memory)
    of recent predictions; a prediction whose answer and decode plan equal a cached one's (modes that
    coincide, e.g. wrap_around and wrap_around_plus below 100 frames) returns the SAME arrays, read-only,
    so neither the upsampling nor the consumer's encoding of them is repeated. 0 disables it; None: 1 GiB.
    """

    def __init__(self, model, tokenizer, frames, feature_budget_bytes: Optional[int] = None, *,
                 naive: bool = False, encode_batch: int = 8, decode_batch: Optional[int] = None,
                 max_prefix_caches: int = 4, max_cached_logits: int = 8, max_vision_images: int = 512,
                 decode_batch_prompts: int = 64, decode_batch_kv_bytes: Optional[int] = None,
                 pair_cache_bytes: Optional[int] = None, exact_rows: Optional[bool] = None,
                 decode_attention: str = DEFAULT_DECODE_ATTENTION, output_cache_bytes: Optional[int] = None):
        if tokenizer is None:
            raise ValueError("VideoContext needs the tokenizer")
        if frames is None or isinstance(frames, (str, bytes)):
            raise ValueError(f"video must be a list of frames, got {type(frames).__name__}")
        source = list(frames)
        self.frames = [f if hasattr(f, "size") and hasattr(f, "convert") else to_pil(f, f"video frame {i}")
                       for i, f in enumerate(source)]
        check_same_size(self.frames, where="video")
        if feature_budget_bytes is not None and feature_budget_bytes < 0:
            raise ValueError(f"feature_budget_bytes must be >= 0 or None, got {feature_budget_bytes}")
        if decode_batch_kv_bytes is not None and (not isinstance(decode_batch_kv_bytes, numbers.Integral)
                                                  or decode_batch_kv_bytes < 0):
            raise ValueError(f"decode_batch_kv_bytes must be an int >= 0 (0: no bound) or None (default), "
                             f"got {decode_batch_kv_bytes!r}")
        for name, value in (("encode_batch", encode_batch), ("decode_batch", decode_batch),
                            ("decode_batch_prompts", decode_batch_prompts)):
            if value is None and name == "decode_batch":  # the device's default, chosen below
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._source = source
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.grounding = model.grounding_encoder
        self.device = model_device(model)
        self.naive = bool(naive)
        self.feature_budget_bytes = feature_budget_bytes
        self.encode_batch = encode_batch
        self.max_prefix_caches = max(0, int(max_prefix_caches))
        self.max_cached_logits = max(0, int(max_cached_logits))
        self.max_vision_images = max(0, int(max_vision_images))
        self.decode_batch_prompts = decode_batch_prompts
        if decode_batch_kv_bytes is None:
            decode_batch_kv_bytes = default_decode_batch_kv_bytes(model, self.device)
        self.decode_batch_kv_bytes = int(decode_batch_kv_bytes)
        self.exact_rows = (self.device.type == "cpu") if exact_rows is None else bool(exact_rows)
        if decode_batch is None:  # GPU: larger mask-decoder calls (their cost is mostly launches)
            decode_batch = DECODE_BATCH if self.exact_rows or self.naive else GPU_DECODE_BATCH
        self.decode_batch = decode_batch
        self.decode_attention = check_decode_attention(decode_attention)
        if pair_cache_bytes is None:
            pair_cache_bytes = PAIR_CACHE_BYTES
        self.pair_cache_bytes = max(0, int(pair_cache_bytes))
        if output_cache_bytes is None:
            output_cache_bytes = OUTPUT_CACHE_BYTES
        self.output_cache_bytes = max(0, int(output_cache_bytes))
        self.num_frames = len(self.frames)
        self.width, self.height = self.frames[0].size if self.frames else (0, 0)
        self.stop_words = list(get_template(self.config.template)["STOP_WORDS"])
        self.img_end_id = token_id(tokenizer, IMG_END_TOKEN)
        self.counters = WorkCounters()
        # frame -> features; ("original", checkpoint, frame) -> the original SAM2 weights' features
        self._features: OrderedDict = OrderedDict()
        self._feature_bytes = 0
        self._vision: OrderedDict = OrderedDict()
        self._prefix: OrderedDict = OrderedDict()
        self._generations: dict = {}
        self._ids: dict = {}  # prompt text -> token ids [1, n] (a video has at most texts x modes prompts)
        self._token_info: dict = {}  # id(ids) -> (ids, TokenKey, canonical boundary), see _tokens
        self._prompts: dict = {}  # (generation key, clip order) -> SAM2 prompt vectors [num_clips, hidden]
        self._tokenize_cache: dict = {}  # the prompts' common head, tokenized once (tokenize_prompt_split)
        self._prefetched: set = set()  # generations computed ahead by prefetch_generations, not yet served
        self._logits: OrderedDict = OrderedDict()
        self._pairs: OrderedDict = OrderedDict()  # (generation key, frame, prompt row) -> low-res logits [h, w]
        self._pair_bytes = 0
        self._outputs: OrderedDict = OrderedDict()  # (logits key, probs format) -> read-only (masks, probs)
        self._output_bytes = 0
        self._eval_held = False  # set by predict_video while it keeps the model in eval mode
        self._frames_loaded = False  # frames decoded before images are built in threads (build_images)
        self._image_jobs: dict = {}  # key -> Future of the pixels of an image built ahead (schedule_images)
        self._sam2_jobs: dict = {}  # (original checkpoint or None, frame) -> Future of its SAM2-sized pixels

    # ------------------------------------------------------------------------------------ helpers
    def same_frames(self, frames) -> bool:
        frames = list(frames)
        return len(frames) == len(self._source) and all(a is b for a, b in zip(frames, self._source))

    @property
    def feature_bytes(self) -> int:
        """Bytes of SAM2 features currently cached."""
        return self._feature_bytes

    @property
    def cached_frames(self) -> list:
        """Frames whose (fine-tuned) SAM2 features are cached, least recently used first."""
        return [k for k in self._features if isinstance(k, int)]

    # ------------------------------------------------------------------------------------ (a) SAM2 features
    def _encode_frames(self, frame_ids: Sequence[int], original: Optional[str] = None) -> FrameFeatures:
        """SAM2 features of ``frame_ids``; ``original``: with the original SAM2 weights of that checkpoint
        (propagation='memory_original_sam2') instead of the model's fine-tuned ones."""
        g = self._grounding_for(original)
        images = torch.stack(self._sam2_pixels(frame_ids, g.image_size, original)).to(self.device)
        feats = g.encode(g.preprocess(images, dtype=module_dtype(g)), chunk_size=self.encode_batch)
        if original is None:
            self.counters.sam2_frames_encoded += len(frame_ids)
        else:
            self.counters.sam2_frames_encoded_original += len(frame_ids)
        return feats

    def _grounding_for(self, original: Optional[str]):
        """The SAM2 grounding whose features are asked for: the model's, or that of the original weights."""
        return self.grounding if original is None else original_sam2_grounding(self.model, original)

    @staticmethod
    def _feature_key(t: int, original: Optional[str]):
        """Key of frame ``t``'s features in the cache (the original weights' beside the model's)."""
        return t if original is None else ("original", original, t)

    def _block(self, frame: int) -> list:
        """The frames of the aligned encode block holding ``frame``."""
        start = frame - frame % self.encode_batch
        return list(range(start, min(start + self.encode_batch, self.num_frames)))

    def _sam2_pixels(self, frame_ids: Sequence[int], size: int, original: Optional[str] = None) -> list:
        """uint8 [3, size, size] of each frame for SAM2 (``sam2_resize``): taken from the resizes started ahead
        (:meth:`schedule_sam2_block`), the others resized in the image workers -- PIL's resize releases the
        GIL, ~25 ms a frame at 640x360 -> 1024 -- or in order with one worker. The same pixels either way."""
        jobs = {t: self._sam2_jobs.pop((original, t), None) for t in frame_ids}
        todo = [t for t, job in jobs.items() if job is None]
        if IMAGE_WORKERS > 1 and len(todo) > 1:
            jobs.update(self._start_sam2_resizes(todo, size))
        return [jobs[t].result() if jobs[t] is not None else sam2_resize(self.frames[t], size) for t in frame_ids]

    def _start_sam2_resizes(self, frame_ids: Sequence[int], size: int) -> dict:
        """{frame: Future of its sam2_resize} in the image workers."""
        self._load_frames()
        pool = image_pool(IMAGE_WORKERS)
        return {t: pool.submit(sam2_resize, self.frames[t], size) for t in frame_ids}

    def schedule_sam2_block(self, frame: int, original: Optional[str] = None) -> int:
        """Start resizing for SAM2, in the image workers, the frames of the encode block holding ``frame``
        that are neither cached nor started, so that they are ready when the block is encoded (the host
        has other work meanwhile: the answers' decoding, the previous block's encoding). Returns the
        number started (0 with one worker or on the naive path)."""
        if IMAGE_WORKERS <= 1 or self.naive or not 0 <= frame < self.num_frames:
            return 0
        todo = [t for t in self._block(frame)
                if (original, t) not in self._sam2_jobs and self._feature_key(t, original) not in self._features]
        if todo:
            started = self._start_sam2_resizes(todo, self._grounding_for(original).image_size)
            self._sam2_jobs.update({(original, t): job for t, job in started.items()})
        return len(todo)

    def _encode_block(self, frame: int, original: Optional[str] = None) -> dict:
        """Encode the aligned block holding ``frame``: the batch composition never depends on the cache."""
        ids = self._block(frame)
        self.schedule_sam2_block(ids[-1] + 1, original)  # the next block, during this one
        feats = self._encode_frames(ids, original)
        out = {}
        for i, t in enumerate(ids):  # own storage per frame, so evicting a frame frees its memory
            one = feats[i]
            out[t] = FrameFeatures(tuple(x.clone() for x in one.high_res), one.low.clone(), feats.pos)
        return out

    @torch.no_grad()
    def frame_features(self, t: int, original: Optional[str] = None) -> FrameFeatures:
        """1-frame SAM2 features of frame ``t`` (computed with its block on a miss); ``original``: of the
        original SAM2 weights of that checkpoint (cached beside the others, under the same budget)."""
        if not 0 <= t < self.num_frames:
            raise ValueError(f"frame index {t} outside 0..{self.num_frames - 1}")
        key = self._feature_key(t, original)
        hit = self._features.get(key)
        if hit is not None:
            self._features.move_to_end(key)
            return hit
        block = self._encode_block(t, original)
        keys = {}
        for k, v in block.items():
            keys[k] = self._feature_key(k, original)
            if keys[k] not in self._features:
                self._features[keys[k]] = v
                self._feature_bytes += v.nbytes
        self._features.move_to_end(key)
        self._evict(protect=set(keys.values()))
        return block[t]

    def _evict(self, protect=()) -> None:
        budget = self.feature_budget_bytes
        if budget is None:
            return
        for key in list(self._features):
            if self._feature_bytes <= budget:
                break
            if key in protect:
                continue
            self._feature_bytes -= self._features.pop(key).nbytes
            self.counters.sam2_features_evicted += 1

    @torch.no_grad()
    def gather_features(self, frame_ids: Sequence[int]) -> FrameFeatures:
        return FrameFeatures.cat([self.frame_features(int(t)) for t in frame_ids])

    # ------------------------------------------------------------------------------------ (b) vision tokens
    def _load_frames(self) -> None:
        """Decode lazily opened frames here, not concurrently in the image workers."""
        if not self._frames_loaded:
            for frame in self.frames:
                load = getattr(frame, "load", None)  # PIL images; other image-likes are used as they are
                if load is not None:
                    load()
            self._frames_loaded = True

    def _start_images(self, todo: Mapping) -> int:
        """Submit the builds of ``todo`` ({key: builder}) not started yet to the KFC-image pool."""
        todo = {key: build for key, build in todo.items() if key not in self._image_jobs}
        if todo:
            self._load_frames()
            pool = image_pool(IMAGE_WORKERS)
            for key, build in todo.items():
                self._image_jobs[key] = pool.submit(build)
        return len(todo)

    def build_images(self, specs: Sequence[ImageSpec]) -> dict:
        """{key: pixels} of the distinct images of ``specs``, each built once: taken from
        :meth:`schedule_images` when it started them, else several built in worker threads (PIL's
        resizes release the GIL; the pixels are those of building them in order)."""
        todo: dict = {}
        for key, build in specs:
            todo.setdefault(key, build)
        if IMAGE_WORKERS > 1 and sum(key not in self._image_jobs for key in todo) > 1:
            self._start_images(todo)
        return {key: self._image_jobs.pop(key).result() if key in self._image_jobs else build()
                for key, build in todo.items()}

    def schedule_images(self, specs: Sequence[ImageSpec]) -> int:
        """Start building, in the worker threads, the images of ``specs`` that are neither encoded nor
        already started, so their pixels are ready when :meth:`vision_tokens` asks for them (while the
        GPU works on earlier images). Returns the number started (0 with one worker)."""
        if IMAGE_WORKERS <= 1:
            return 0
        return self._start_images({key: build for key, build in specs if key not in self._vision})

    @torch.no_grad()
    def vision_tokens(self, specs: Sequence[ImageSpec]) -> torch.Tensor:
        """[n_images, tokens, D]; each distinct image through the ViT once: alone (batch of 1) with
        ``exact_rows``, so its tokens never depend on the other images; else (GPU) the prompt's missing
        images ``VISION_BATCH`` per call -- a 448 px image alone leaves most of a GPU idle."""
        vision = self.model.vision_model
        dtype = module_dtype(vision)
        keys = list(dict.fromkeys(k for k, _ in specs))
        have = {k: t for k in keys if (t := lru_get(self._vision, k)) is not None}
        missing = [k for k in keys if k not in have]
        built = self.build_images([(k, b) for k, b in specs if k not in have])
        step = 1 if self.exact_rows else VISION_BATCH
        for start in range(0, len(missing), step):
            chunk = missing[start:start + step]
            pixels = torch.stack([built[k] for k in chunk]).to(device=self.device, dtype=dtype)
            for key, tokens in zip(chunk, self.model.extract_feature(pixels)):
                have[key] = tokens
                lru_put(self._vision, key, tokens, self.max_vision_images)
            self.counters.mllm_images_encoded += len(chunk)
        return torch.stack([have[k] for k, _ in specs])

    def _vision_tokens_naive(self, specs: Sequence[ImageSpec]) -> torch.Tensor:
        """Every image of the prompt through the ViT, uncached: in one batch as the reference does, or,
        with ``exact_rows``, one image at a time (the shared path's unit, so the tokens are its bits)."""
        vision = self.model.vision_model
        built = self.build_images(specs)
        pixels = torch.stack([built[k] for k, _ in specs]).to(device=self.device, dtype=module_dtype(vision))
        self.counters.mllm_images_encoded += len(specs)
        if self.exact_rows:
            return torch.cat([self.model.extract_feature(pixels[i:i + 1]) for i in range(len(specs))])
        return self.model.extract_feature(pixels)

    def clip_image_specs(self, indices: Sequence[int]) -> list:
        """KFC images (key_0, grid_0, key_1, ...) as (key, builder) pairs; keys match kfc_mllm_images'."""
        cfg = self.config
        size, grid = cfg.image_size, cfg.grid_size

        def builder(clip, which):
            return lambda: kfc_image(self.frames, clip, which, grid, size)

        return [(kfc_image_key(clip, which, grid, size), builder(clip, which))
                for clip in split_clips(indices, cfg.num_clips) for which in (0, 1)]

    # ------------------------------------------------------------------------------------ (c)+(d) generation
    def _prefix_for(self, ids: torch.Tensor, specs: Sequence[ImageSpec], boundary: int):
        """The KV cache of ``ids[:, :boundary]`` with the images of ``specs`` (LRU; counted)."""
        pkey = (TokenKey(self._tokens(ids)[0][:boundary]), tuple(k for k, _ in specs))
        prefix = lru_get(self._prefix, pkey)
        if prefix is None:
            vision = self.vision_tokens(specs) if specs else None
            prefix = self.model.build_prefix_cache(ids[:, :boundary], vision_embeds=vision)
            self.counters.tokens_prefilled += boundary
            lru_put(self._prefix, pkey, prefix, self.max_prefix_caches)
        else:
            self.counters.prefix_tokens_reused += boundary
        return prefix

    def _store(self, gkey: tuple, answer, num_prompt_tokens: int) -> "Generation":
        self.counters.tokens_prefilled += num_prompt_tokens
        self.counters.tokens_decoded += max(int(answer.ids.numel()) - 1, 0)  # the last token is never fed back
        gen = Generation(gkey, answer.ids, answer.text, answer.seg_hidden_states)
        if not self.naive:
            self._generations[gkey] = gen
        return gen

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, specs: Sequence[ImageSpec], max_new_tokens: int) -> Generation:
        """Greedy answer for prompt ``ids`` whose <IMG_CONTEXT> blocks show the images of ``specs``."""
        max_seg = self._max_seg(specs)
        gkey = self.generation_key(ids, specs, max_new_tokens)
        if not self.naive and gkey in self._generations:
            if gkey in self._prefetched:  # computed ahead in a batch: its first use is not a reuse
                self._prefetched.discard(gkey)
            else:
                self.counters.generations_reused += 1
            return self._generations[gkey]
        model, n = self.model, int(ids.shape[1])
        common = dict(tokenizer=self.tokenizer, stop_words=self.stop_words, max_new_tokens=max_new_tokens,
                      max_seg_tokens=max_seg)
        boundary = 0 if self.naive and not self.exact_rows else self._tokens(ids)[1]
        if self.naive:  # everything recomputed; with exact_rows in the shared path's two prefill chunks
            vision = self._vision_tokens_naive(specs) if specs else None
            prefix = model.build_prefix_cache(ids[:, :boundary], vision_embeds=vision) if boundary else None
            answer = model.generate_answer(ids, vision_embeds=None if boundary else vision, prefix_cache=prefix,
                                           **common)
        elif boundary:
            prefix = self._prefix_for(ids, specs, boundary)
            answer = model.generate_answer(ids, prefix_cache=prefix, **common)
            n -= boundary
        else:
            vision = self.vision_tokens(specs) if specs else None
            answer = model.generate_answer(ids, vision_embeds=vision, **common)
        return self._store(gkey, answer, n)

    def generation_key(self, ids: torch.Tensor, specs: Sequence[ImageSpec], max_new_tokens: int) -> tuple:
        """Key of the generation cache: same tokens, images and decoding limits -> same greedy answer."""
        return (self._tokens(ids)[0], tuple(k for k, _ in specs), int(max_new_tokens), self._max_seg(specs))

    def _tokens(self, ids: torch.Tensor, host_ids: Optional[list] = None) -> tuple:
        """(TokenKey, canonical boundary) of prompt ``ids`` [1, n], read from the device once per prompt
        tensor the context keeps (each read of a CUDA tensor is a sync, and a prediction needed several);
        ``host_ids``: the same ids as a list, when the caller has them (then nothing is read back)."""
        info = self._token_info.get(id(ids))
        if info is not None and info[0] is ids:
            return info[1], info[2]
        tokens = TokenKey(ids[0].tolist() if host_ids is None else host_ids)
        boundary = canonical_boundary(tokens, self.img_end_id)
        if not self.naive:  # the entry holds ids, so id(ids) cannot be reused while it is there
            self._token_info[id(ids)] = (ids, tokens, boundary)
        return tokens, boundary

    def _max_seg(self, specs) -> Optional[int]:
        """Video prompts stop generating after ``num_clips`` [SEG] states (see ``generate_answer``)."""
        return int(self.config.num_clips) if specs else None

    def can_batch_generations(self) -> bool:
        """Batched decoding is used unless disabled, naive, or the model's ``generate_answer`` was
        replaced on the instance (a wrapper -- e.g. a test's scripted LM head resetting per call --
        that the batched ``generate_answers`` would bypass) without ``generate_answers`` being too."""
        model = self.model
        if self.naive or self.decode_batch_prompts < 2 or not callable(getattr(model, "generate_answers", None)):
            return False
        own = getattr(model, "__dict__", {})
        return "generate_answer" not in own or "generate_answers" in own

    @torch.no_grad()
    def prefetch_generations(self, requests: Sequence[tuple], options: Optional[InferenceOptions] = None) -> int:
        """Compute ahead, in batches, every answer that ``requests`` ((text, mode, selected_fids[, past_text])
        tuples) need and that is not cached yet; :meth:`predict` then finds them in the generation cache.

        Distinct prompts are ordered by prompt prefix (so prompts sharing images sit together) and
        greedy-decoded in balanced batches of at most :meth:`decode_batch_limit` prompts with
        ``model.generate_answers`` (``exact=exact_rows``); prompts with different images (q_frame)
        share a batch too. Returns the number of answers computed. A request that cannot be planned
        (bad mode, missing selected_fids, ...) is skipped: its own ``predict`` call reports the
        error. Counters are those of computing each answer alone.
        """
        if not self.can_batch_generations() or not self.num_frames:
            return 0
        options = options or InferenceOptions()
        max_new = int(options.max_new_tokens)
        groups: "OrderedDict[tuple, list]" = OrderedDict()
        seen = set()
        for request in requests:
            text, mode, fids = request[:3]
            past = request[3] if len(request) > 3 else ""
            try:
                _, specs, ids = self._prompt(text, mode, fids, past)
            except Exception:
                continue
            gkey = self.generation_key(ids, specs, max_new)
            if gkey in self._generations or gkey in seen:
                continue
            boundary = self._tokens(ids)[1]
            if not boundary:
                continue  # no image prefix: left to generate()
            seen.add(gkey)
            # grouped by prompt prefix and images (gkey: ids, image keys, ...)
            groups.setdefault((gkey[0][:boundary], gkey[1]), []).append((gkey, ids, specs, boundary))
        todo = [item for group in groups.values() for item in group]
        group_specs = [items[0][2] for items in groups.values()]
        group_of = {gkey: g for g, items in enumerate(groups.values()) for gkey, _, _, _ in items}

        def images_ahead(gkey) -> None:  # this prefix's images and the next ones' build during its GPU work
            g = group_of[gkey]
            for specs in group_specs[g:g + IMAGE_LOOKAHEAD_PREFIXES]:
                self.schedule_images(specs)

        done = 0
        num_chunks = -(-len(todo) // self.decode_batch_limit(todo, max_new))
        base, extra = divmod(len(todo), max(num_chunks, 1))
        start = 0
        for c in range(num_chunks):  # balanced chunks: no small leftover batch
            chunk = todo[start:start + base + (c < extra)]
            start += len(chunk)
            if len(chunk) == 1:
                gkey, ids, specs, _ = chunk[0]
                images_ahead(gkey)
                self.schedule_sam2_block(0)
                self.generate(ids, specs, max_new)
                self._prefetched.add(gkey)
                done += 1
                continue
            prefixes = []
            for gkey, ids, specs, boundary in chunk:
                images_ahead(gkey)
                prefixes.append(self._prefix_for(ids, specs, boundary))
            # (decode_attention only when not the default: generate_answers of other models may lack it)
            # the first SAM2 frames resized while the answers are decoded (after the prefixes' images: the
            # workers build those first)
            self.schedule_sam2_block(0)
            answers = self.model.generate_answers([ids for _, ids, _, _ in chunk], prefix_cache=prefixes,
                                                  tokenizer=self.tokenizer, stop_words=self.stop_words,
                                                  max_new_tokens=max_new, exact=self.exact_rows,
                                                  max_seg_tokens=self._max_seg(chunk[0][2]),
                                                  **({"decode_attention": self.decode_attention}
                                                     if self.decode_attention != DEFAULT_DECODE_ATTENTION else {}))
            del prefixes
            for (gkey, ids, _, boundary), answer in zip(chunk, answers):
                self._store(gkey, answer, int(ids.shape[1]) - boundary)
                self._prefetched.add(gkey)
                done += 1
        return done

    def decode_batch_limit(self, todo: Sequence[tuple], max_new_tokens: int) -> int:
        """Most prompts of ``todo`` ((generation key, ids, specs, boundary) items, in batch order) per batch:
        ``decode_batch_prompts``, lowered so that a batch's KV caches fit ``decode_batch_kv_bytes``. Each
        row holds its prompt plus the answer room the batched cache reserves (``min(max_new_tokens,
        256)``); each distinct prefix (shared by the prompts of a mode, one per q_frame prompt) is held
        once; a batch is charged the average over ``todo``."""
        limit = self.decode_batch_prompts
        if not self.decode_batch_kv_bytes or not todo:
            return limit
        room = min(int(max_new_tokens), 256)
        prefixes = {(gkey[0][:boundary], gkey[1]): boundary for gkey, _, _, boundary in todo}
        tokens = sum(int(ids.shape[1]) + room for _, ids, _, _ in todo) + sum(prefixes.values())
        per_token = kv_bytes_per_token(self.config.llm_config, module_dtype(self.model.language_model))
        return max(1, min(limit, self.decode_batch_kv_bytes * len(todo) // max(tokens * per_token, 1)))

    # ------------------------------------------------------------------------------------ SAM2 decoding
    @torch.no_grad()
    def decode_pairs(self, pairs: Sequence[tuple], prompts: torch.Tensor,
                     features: Optional[FrameFeatures] = None) -> torch.Tensor:
        """Low-res logits [len(pairs), h, w]: pair (frame, k) decoded with prompts[k] ('infer' flavour).

        Decoded ``decode_batch`` pairs at a time, under :class:`RowExact` with ``exact_rows`` (CPU): a
        pair's logits then do not depend on the rest of its chunk, so cached pairs, the shared path's
        sorted distinct pairs and the naive path's every decode call give the same bits; ``features``
        (all frames, naive mode) bypasses the cache.
        """
        index = long_index([int(k) for _, k in pairs], prompts.device)
        return self.decode_rows([int(f) for f, _ in pairs], prompts.index_select(0, index), features)

    def decode_rows(self, frames: Sequence[int], rows: torch.Tensor,
                    features: Optional[FrameFeatures] = None) -> torch.Tensor:
        """Low-res logits [len(frames), h, w]: frames[m] decoded with the prompt vector rows[m] (see
        :meth:`decode_pairs`; rows may come from different answers)."""
        out = []
        for start in range(0, len(frames), self.decode_batch):
            chunk = [int(f) for f in frames[start:start + self.decode_batch]]
            prompts = rows[start:start + len(chunk)]
            # RowExact: a batch of one runs other CPU kernels (other bits) than every larger batch, which
            # all agree; a lone pair is decoded twice in one batch so that its bits do not depend on it
            lone = self.exact_rows and len(chunk) == 1
            batch = chunk * 2 if lone else chunk
            if features is None:
                feats, ids = self.gather_features(batch), list(range(len(batch)))
            else:
                feats, ids = features, batch
            with RowExact() if self.exact_rows else contextlib.nullcontext():
                low = self.grounding.decode(feats, ids, prompts.expand(2, -1) if lone else prompts, mode="infer")
            out.append(low[:1] if lone else low)
            self.counters.sam2_decodes += len(chunk)
        if not out:
            size = self.grounding.low_res_size
            return torch.zeros((0, size, size), dtype=torch.float32, device=self.device)
        return torch.cat(out)

    def plan_for(self, mode: str, indices: Sequence[int], options: InferenceOptions) -> DecodePlan:
        """decode_plan, or with propagation='none' a Path A plan replacing Path C's memory tracking.

        propagation='none': conditioning frames keep the prompt the plan gives them (so
        q_frame_anchor_fix still decides Q1) and every other frame is decoded with the prompt of the
        nearest conditioning frame (ties: the earlier one), e.g. wrap_around L>100 uses P_{f//10} for
        f < 100 and P_9 after.
        """
        cfg = self.config
        plan = decode_plan(self.num_frames, mode, list(indices), cfg.num_clips,
                           q_frame_anchor_fix=options.q_frame_anchor_fix, uncovered_fix=options.uncovered_fix)
        if plan.path != "C" or options.propagation != "none":
            return plan
        cond = dict(zip(plan.decode_frames, plan.prompt_index))
        anchors = np.asarray(sorted(cond))
        mapping = []
        for f in range(self.num_frames):
            if f in cond:
                mapping.append(cond[f])
                continue
            dist = np.abs(anchors - f)
            nearest = int(anchors[int(np.argmin(dist))])  # argmin takes the first (earlier) on a tie
            mapping.append(cond[nearest])
        return DecodePlan("A", list(range(self.num_frames)), mapping, self.num_frames, False)

    def _propagate(self, cond: dict, features: Optional[FrameFeatures],
                   options: Optional[InferenceOptions] = None) -> torch.Tensor:
        """Path C; frames before the first conditioning frame (only with q_frame_anchor_fix) are
        tracked backward by running the same forward tracker on the time-reversed video.

        propagation='memory_original_sam2' (Sa2VA-i): the conditioning frames are decoded with the
        fine-tuned decoder as Path A decodes them, and their masks are propagated by the original SAM2
        weights of ``options.sam2_original_checkpoint`` on that model's own frame features.
        """
        L = self.num_frames
        original = None
        if options is not None and options.propagation == "memory_original_sam2":
            original = options.sam2_original_checkpoint
        if original is None:
            fetch: Callable[[int], FrameFeatures] = (lambda t: features[t]) if features is not None \
                else self.frame_features

            def propagate(conditions, frame_of):
                return self.grounding.propagate(lambda r: fetch(frame_of(r)), L, conditions)
        else:
            frames = sorted(cond)
            low = self.decode_rows(frames, torch.stack([cond[f] for f in frames]), features)
            tuned = dict(zip(frames, low))  # the conditioning frames' outputs: the fine-tuned decoder's
            size = (self.height, self.width)  # their masks as predicted, at video resolution
            cond = {f: torch.sigmoid(self.grounding.upsample_logits(tuned[f][None], size)[0]) > 0.5 for f in frames}
            twin = original_sam2_grounding(self.model, original).sam2_model
            own = self._encode_frames(list(range(L)), original) if features is not None else None
            fetch = (lambda t: own[t]) if own is not None else (lambda t: self.frame_features(t, original))

            def propagate(conditions, frame_of):
                out = propagate_masks_with_memory(twin, lambda r: fetch(frame_of(r)), L, conditions)
                for r in conditions:
                    out[r] = tuned[frame_of(r)].to(out)
                return out
        first = min(cond)
        out = propagate(cond, lambda t: t)
        if original is None:
            self.counters.sam2_decodes += len(cond)
        self.counters.sam2_frames_tracked += (L - first) - sum(1 for f in cond if f >= first)
        if first > 0:
            rev = propagate({L - 1 - f: p for f, p in cond.items()}, lambda r: L - 1 - r)
            out[:first] = rev.flip(0)[:first]
            if original is None:
                self.counters.sam2_decodes += len(cond)
            self.counters.sam2_frames_tracked += (max(cond) + 1) - len(cond)
        return out

    @torch.no_grad()
    def plan_logits(self, plan: DecodePlan, prompts: torch.Tensor, options: InferenceOptions,
                    features: Optional[FrameFeatures] = None, pair_key=None) -> torch.Tensor:
        """Low-res logits [L, h, w] of every real frame for ``plan`` (``prompts``: one per clip).

        ``pair_key`` (hashable, e.g. the generation key and the prompt order, as :meth:`predict` passes;
        None: no pair caching): with the pair cache on, single (frame, prompt) decodes of Path A/B plans
        are cached under it, so another plan of the same prompts (another mode with the same answer)
        decodes only the pairs not decoded yet.
        """
        if plan.path == "C":
            cond = {f: prompts[k] for f, k in zip(plan.decode_frames, plan.prompt_index)}
            return self._propagate(cond, features, options)
        calls = list(zip(plan.decode_frames, plan.prompt_index))
        if features is not None:  # naive: every decode call, as the reference does
            low = self.decode_pairs(calls, prompts, features)
        else:  # equal (frame, prompt) pairs give equal logits: decode each once, then expand
            unique = sorted(set((int(f), int(k)) for f, k in calls))
            position = {pair: i for i, pair in enumerate(unique)}
            low_unique = self._decode_unique(unique, prompts, pair_key)
            index = long_index([position[(int(f), int(k))] for f, k in calls], low_unique.device)
            low = low_unique.index_select(0, index)
        return combine_decoded_logits(plan, low, average=options.path_b_average)

    def _decode_unique(self, unique: list, prompts: torch.Tensor, pair_key) -> torch.Tensor:
        """decode_pairs over distinct pairs, through the per-video pair cache when ``pair_key`` is given."""
        if pair_key is None or not self.pair_cache_bytes:
            return self.decode_pairs(unique, prompts)
        rows = {}
        missing = []
        for pair in unique:
            hit = self._pairs.get((pair_key, pair))
            if hit is None:
                missing.append(pair)
            else:
                self._pairs.move_to_end((pair_key, pair))
                rows[pair] = hit
        if missing:
            stored = self._put_pairs([(pair_key, pair) for pair in missing], self.decode_pairs(missing, prompts))
            rows.update(zip(missing, stored))
            self._trim_pairs()
        return torch.stack([rows[pair] for pair in unique])

    def _put_pairs(self, keys: Sequence[tuple], fresh: torch.Tensor) -> list:
        """Cache freshly decoded pairs (each in its own storage, so evicting a pair frees it)."""
        stored = []
        for key, low in zip(keys, fresh):
            low = low.clone()
            self._pairs[key] = low
            self._pair_bytes += low.numel() * low.element_size()
            stored.append(low)
        return stored

    def _trim_pairs(self) -> None:
        """Drop the least recently used pairs beyond ``pair_cache_bytes``."""
        while self._pair_bytes > self.pair_cache_bytes and self._pairs:
            _, old = self._pairs.popitem(last=False)
            self._pair_bytes -= old.numel() * old.element_size()

    def _clip_prompts(self, gen: Generation, order: Sequence[int]) -> torch.Tensor:
        """SAM2 prompt vectors of an answer's [SEG] states, one per clip in ``order`` (seg_prompt_indices);
        kept per (answer, order): the modes sharing an answer, and prefetch_decodes, ask for them again."""
        key = None if self.naive else (gen.key, tuple(int(k) for k in order))
        prompts = None if key is None else self._prompts.get(key)
        if prompts is None:
            index = long_index(order, self.device)
            prompts = seg_prompts(self.model, gen.seg_hidden_states).index_select(0, index)
            if key is not None:
                self._prompts[key] = prompts
        return prompts

    @staticmethod
    def _logits_key(gen: Generation, plan: DecodePlan, options: InferenceOptions) -> tuple:
        """Key of the combined-logits cache: one answer decoded by one plan."""
        return (gen.key, plan.path, tuple(plan.decode_frames), tuple(plan.prompt_index),
                options.path_b_average if plan.path == "B" else
                (options.propagation, options.sam2_original_checkpoint) if plan.path == "C" else None)

    @torch.no_grad()
    def prefetch_decodes(self, requests: Sequence[tuple], options: Optional[InferenceOptions] = None) -> int:
        """Decode ahead, across answers, the (frame, [SEG]) pairs that the Path A/B plans of the leading
        ``requests`` ((text, mode, selected_fids[, past_text]), in the order :meth:`predict` will take
        them) need and the pair cache lacks, ``decode_batch`` pairs per SAM2 call. One answer's plan has
        only ~10-20 distinct pairs, and on a GPU a small mask-decoder call costs mostly its launches.

        Takes requests while their pairs (new and already cached) fit ``pair_cache_bytes``, so none is
        evicted before ``predict`` reads it; returns how many requests it covered (>= 1 when there are
        any). A request whose answer is not generated yet, has no [SEG] or uses Path C (memory
        propagation) is covered without decoding: ``predict`` handles it as before. Same pairs, same
        decodes and counters as ``predict`` alone would do; with ``exact_rows`` the same bits.
        """
        if not requests:
            return 0
        if self.naive or not self.pair_cache_bytes or not self.num_frames:
            return len(requests)
        options = options or InferenceOptions()
        size = int(self.grounding.low_res_size)
        capacity = self.pair_cache_bytes // max(size * size * 4, 1)  # float32 low-res logits per pair
        needed: "OrderedDict[tuple, None]" = OrderedDict()  # (pair key, (frame, k)) in first-use order
        answers = {}  # pair key -> (generation, prompt order)
        covered = 0
        for request in requests:
            text, mode, fids = request[:3]
            past = request[3] if len(request) > 3 else ""
            mine = []
            try:
                indices, specs, ids = self._prompt(text, mode, fids, past)
                gen = self._generations.get(self.generation_key(ids, specs, options.max_new_tokens))
                order = None if gen is None else seg_prompt_indices(int(gen.seg_hidden_states.shape[0]),
                                                                    self.config.num_clips)
                plan = None if order is None else self.plan_for(mode, indices, options)
            except Exception:  # predict reports it
                plan = None
            if plan is not None and plan.path != "C" and self._logits_key(gen, plan, options) not in self._logits:
                pair_key = (gen.key, tuple(order))
                answers[pair_key] = (gen, order)
                mine = [(pair_key, (int(f), int(k))) for f, k in sorted(set(zip(plan.decode_frames,
                                                                                 plan.prompt_index)))]
            new = [key for key in dict.fromkeys(mine) if key not in needed]
            if len(needed) + len(new) > capacity:
                if not covered:  # alone beyond the cache: predict decodes it as before
                    covered = 1
                break
            needed.update((key, None) for key in new)
            covered += 1
        missing = [key for key in needed if key not in self._pairs]
        if missing:
            prompts = {}
            for pair_key, _ in missing:
                if pair_key not in prompts:
                    prompts[pair_key] = self._clip_prompts(*answers[pair_key])
            missing.sort(key=lambda key: key[1][0])  # frame-major
            rows = torch.stack([prompts[pair_key][k] for pair_key, (_, k) in missing])
            self._put_pairs(missing, self.decode_rows([f for _, (f, _) in missing], rows))
        for key in needed:  # most recently used: the eviction below keeps every pair of the window
            if key in self._pairs:
                self._pairs.move_to_end(key)
        self._trim_pairs()
        return covered

    # ------------------------------------------------------------------------------------ one prediction
    @torch.no_grad()
    def predict(self, text: str, mode: str = "uniform", selected_fids=None, return_probs: bool = False,
                past_text: str = "", options: Optional[InferenceOptions] = None) -> dict:
        """One expression in one mode (spec evaluation.md §1-2); the result dict of predict_forward."""
        # predict_video holds eval mode for the whole video (switching it walks every module, each call)
        with contextlib.nullcontext() if self._eval_held and not self.model.training else eval_mode(self.model):
            return self._predict(text, mode, selected_fids, return_probs, past_text,
                                 options or InferenceOptions())

    def _prompt(self, text, mode, selected_fids, past_text=""):
        """(frame indices, image specs, prompt ids [1, n]) of one expression in one mode."""
        cfg = self.config
        L = self.num_frames
        if L == 0:
            raise ValueError("video has no frames")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
        if mode == "q_frame" and selected_fids is None:
            raise ValueError(f"mode 'q_frame' needs selected_fids: the {cfg.num_sampled_frames} frame indices "
                             f"selected for this expression (selected_frames.json)")
        indices = select_indices(L, mode, cfg.num_sampled_frames, selected_fids if mode == "q_frame" else None)
        specs = self.clip_image_specs(indices)
        image_tokens = image_token_string(len(specs), self.model.num_image_token)
        prompt = build_prompt_text(text, image_tokens, cfg.template, past_text)
        ids = None if self.naive else self._ids.get(prompt)
        if ids is None:  # ~10 ms for a 20-image prompt; prefetch_generations and predict both need it
            cpu_ids = (tokenize_prompt(self.tokenizer, prompt, "cpu") if self.naive else
                       tokenize_prompt_split(self.tokenizer, prompt, self._tokenize_cache))
            ids = cpu_ids.to(self.device)
            if not self.naive:
                self._ids[prompt] = ids
                self._tokens(ids, cpu_ids[0].tolist())  # read here, not back from the device
        return indices, specs, ids

    def _predict(self, text, mode, selected_fids, return_probs, past_text, options) -> dict:
        cfg = self.config
        L = self.num_frames
        indices, specs, ids = self._prompt(text, mode, selected_fids, past_text)
        gen = self.generate(ids, specs, options.max_new_tokens)
        answer = gen.text.strip()
        num_seg = int(gen.seg_hidden_states.shape[0])
        order = seg_prompt_indices(num_seg, cfg.num_clips)
        size = (self.height, self.width)
        if order is None:  # robustness fix (spec §11.2): empty masks, the run goes on
            masks = np.zeros((L, *size), dtype=bool)
            probs = empty_probs((L, *size), return_probs)
            return make_result(answer, [masks], [probs] if return_probs else None, 0, "no_seg", return_probs)
        plan = self.plan_for(mode, indices, options)
        lkey = self._logits_key(gen, plan, options)
        okey = (lkey, probs_format(return_probs))
        outputs = None if self.naive else lru_get(self._outputs, okey)
        if outputs is not None:
            self.counters.logits_reused += 1
            self.counters.outputs_reused += 1
            masks, probs = outputs
            return make_result(answer, [masks], [probs] if return_probs else None, num_seg, "ok", return_probs)
        low = None if self.naive else lru_get(self._logits, lkey)
        if low is not None:
            self.counters.logits_reused += 1
        else:
            prompts = self._clip_prompts(gen, order)
            features = self._encode_frames(list(range(L))) if self.naive else None
            low = self.plan_logits(plan, prompts, options, features, pair_key=(gen.key, tuple(order)))
            if not self.naive:
                lru_put(self._logits, lkey, low, self.max_cached_logits)
        masks, probs = logits_to_outputs(self.grounding, low, size, return_probs)
        if not self.naive:
            self._keep_outputs(okey, masks, probs)
        return make_result(answer, [masks], [probs] if return_probs else None, num_seg, "ok", return_probs)

    def _keep_outputs(self, key: tuple, masks: np.ndarray, probs: Optional[np.ndarray]) -> None:
        """Cache one prediction's full-size outputs within ``output_cache_bytes`` (oldest dropped first),
        made read-only: they are handed out again, as they are, for every prediction that coincides."""
        size = masks.nbytes + (0 if probs is None else probs.nbytes)
        if size > self.output_cache_bytes:
            return
        for array in (masks, probs):
            if array is not None:
                array.flags.writeable = False
        self._outputs[key] = (masks, probs)
        self._output_bytes += size
        while self._output_bytes > self.output_cache_bytes:
            _, (m, p) = self._outputs.popitem(last=False)
            self._output_bytes -= m.nbytes + (0 if p is None else p.nbytes)


# ============================================================================================ entry points
# predict_forward / predict_video of SaSaSa2VAChatModel delegate here.
def predict_forward(model, image=None, video=None, text=None, tokenizer=None, mode="uniform",
                    selected_fids=None, past_text="", mask_prompts=None, print_answer=False,
                    return_probs=False, **options) -> dict:
    """One expression on one image or video; see SaSaSa2VAChatModel.predict_forward."""
    if tokenizer is None:
        raise ValueError("predict_forward needs the tokenizer (tokenizer=...)")
    if mask_prompts is not None:
        raise ValueError("predict_forward: mask_prompts (visual prompts) are not supported by this model")
    if image is not None and video is not None:
        raise ValueError("predict_forward: pass image or video, not both")
    probs_format(return_probs)
    opts, ctx_opts = split_options(options)
    with torch.no_grad(), eval_mode(model):
        if video is not None:
            # one prediction: nothing to hand out twice, so the arrays stay the caller's (writable)
            ctx = VideoContext(model, tokenizer, video, output_cache_bytes=0, **ctx_opts)
            out = ctx.predict(text, mode, selected_fids=selected_fids, return_probs=return_probs,
                              past_text=past_text, options=opts)
        else:
            out = predict_image_or_text(model, tokenizer, image, text, past_text, return_probs, opts,
                                        **ctx_opts)
    if print_answer:
        print(out["prediction"])
    return out


def predict_video(model, frames, texts: Sequence[str], tokenizer, modes: Sequence[str],
                  selected_fids=None, return_probs: bool = True, context=None,
                  on_result: Optional[Callable[[str, int, dict], None]] = None, keep_results: bool = True,
                  errors: str = "raise", **options) -> dict:
    """Every (text, mode) of one video through one VideoContext; see SaSaSa2VAChatModel.predict_video."""
    probs_format(return_probs)
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    opts, ctx_opts = split_options(options)
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string")
    texts = list(texts)
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct, got {modes}")
    fids = [_selected_for(selected_fids, i, t) for i, t in enumerate(texts)]
    if "q_frame" in modes and errors == "raise":
        missing = [i for i, f in enumerate(fids) if f is None]
        if missing:
            raise ValueError(f"mode 'q_frame' needs selected_fids for every text; missing for text index(es) "
                             f"{missing[:10]}")
    if context is None:
        if frames is None:
            raise ValueError("predict_video needs frames (or a VideoContext via context=)")
        context = VideoContext(model, tokenizer, frames, **ctx_opts)
    else:
        if context.model is not model:
            raise ValueError("predict_video: the context was built for another model")
        if frames is not None and not context.same_frames(frames):
            raise ValueError("predict_video: frames differ from the frames of the given context")
        if ctx_opts:
            raise ValueError(f"predict_video: {sorted(ctx_opts)} are fixed when the context is built; "
                             f"pass them to VideoContext instead")
    results = {mode: [None] * len(texts) for mode in modes}
    requests = [(text, mode, fids[i]) for i, text in enumerate(texts) for mode in modes]  # text-major
    with torch.no_grad(), eval_mode(model):
        # every answer the video needs, greedy-decoded in batches up front (the loop finds them cached)
        try:
            context.prefetch_generations(requests, options=opts)
        except Exception:
            if errors == "raise":
                raise
            logger.warning("batched decoding failed; answers are computed one at a time", exc_info=True)
        held, context._eval_held = context._eval_held, True
        window_end, decode_ahead = 0, True
        try:
            # text-major: the modes of one text share answers and logits
            for r, (text, mode, selected) in enumerate(requests):
                if decode_ahead and r >= window_end:  # the SAM2 decodes of the next requests, batched
                    try:
                        window_end = r + context.prefetch_decodes(requests[r:], options=opts)
                    except Exception:
                        if errors == "raise":
                            raise
                        logger.warning("batched SAM2 decoding failed; pairs are decoded per prediction",
                                       exc_info=True)
                        decode_ahead = False
                try:
                    out = context.predict(text, mode, selected_fids=selected, return_probs=return_probs,
                                          options=opts)
                except Exception as exc:
                    if errors == "raise":
                        raise
                    out = {"prediction": "", "prediction_masks": [], "num_seg": 0, "status": "failed",
                           "error": f"{type(exc).__name__}: {exc}"}
                i = r // len(modes)
                if on_result is not None:
                    on_result(mode, i, out)
                if keep_results:
                    results[mode][i] = out
        finally:
            context._eval_held = held
    return results


def _selected_for(selected_fids, index: int, text: str):
    """selected_fids: None, a list aligned with texts, or a dict keyed by text index or text."""
    if selected_fids is None:
        return None
    if isinstance(selected_fids, Mapping):
        if index in selected_fids:
            return selected_fids[index]
        return selected_fids.get(text)
    if isinstance(selected_fids, (list, tuple)):
        if len(selected_fids) and isinstance(selected_fids[0], numbers.Integral):
            raise ValueError("predict_video: selected_fids must map each text to its list (a dict keyed by "
                             "text index, or a list of lists), got a flat list of ints")
        return selected_fids[index] if index < len(selected_fids) else None
    raise ValueError(f"selected_fids must be None, a dict or a list of lists, got {type(selected_fids).__name__}")


def predict_image_or_text(model, tokenizer, image, text, past_text, return_probs, opts: InferenceOptions,
                          naive: bool = False, feature_budget_bytes=None) -> dict:
    """Single image (InternVL dynamic tiles, one mask [1,H,W] per [SEG]) or text only (no masks)."""
    config = model.config
    if image is None:
        prompt = build_prompt_text(text, None, config.template, past_text)
        ids = tokenize_prompt(tokenizer, prompt, model_device(model))
        ctx = VideoContext(model, tokenizer, [], naive=naive)
        gen = ctx.generate(ids, [], opts.max_new_tokens)
        n_seg = int(gen.seg_hidden_states.shape[0])
        return make_result(gen.text.strip(), [], [], n_seg, "ok" if n_seg else "no_seg", return_probs)
    pil = to_pil(image)
    size = config.image_size
    if config.dynamic_image_size:
        tiles = dynamic_preprocess(pil, config.min_dynamic_patch, config.max_dynamic_patch, size,
                                   config.use_thumbnail)
    else:
        tiles = [pil]
    pixels = torch.stack([mllm_transform(t, size) for t in tiles])
    image_tokens = image_token_string(len(tiles), model.num_image_token)
    prompt = build_prompt_text(text, image_tokens, config.template, past_text)
    ids = tokenize_prompt(tokenizer, prompt, model_device(model))
    ctx = VideoContext(model, tokenizer, [pil], naive=naive, feature_budget_bytes=feature_budget_bytes)
    specs = [(("tile", size, len(tiles), k), (lambda k=k: pixels[k])) for k in range(len(tiles))]
    gen = ctx.generate(ids, specs, opts.max_new_tokens)
    n_seg = int(gen.seg_hidden_states.shape[0])
    h, w = pil.size[1], pil.size[0]
    if n_seg == 0:
        return make_result(gen.text.strip(), [], [], 0, "no_seg", return_probs)
    prompts = seg_prompts(model, gen.seg_hidden_states)
    low = ctx.decode_pairs([(0, k) for k in range(n_seg)], prompts)
    masks, probs = logits_to_outputs(model.grounding_encoder, low, (h, w), return_probs)
    return make_result(gen.text.strip(), [m[None] for m in masks],
                       [p[None] for p in probs] if probs is not None else None, n_seg, "ok", return_probs)
