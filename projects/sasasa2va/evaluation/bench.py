"""Helpers of the evaluation/training benchmarks (tools/benchmark_eval.py, issue 6).

* :class:`ForcedAnswer` -- BENCHMARK-ONLY: makes a (random-init) model answer a fixed token sequence,
  so both evaluation paths generate the same, realistic number of tokens and [SEG]s.
* :class:`ObjectLikeMasks` -- BENCHMARK-ONLY: a random model's near-0.5 mask logits get a fixed object-shaped
  field added, so its outputs cost what a trained model's cost to store (``--object-like-masks``).
* :func:`make_bench_splits` -- a synthetic MeViS valid_u-like split with a chosen number of expressions
  per video (extra expressions are re-worded copies with their own Q-frame lists); the split with E
  expressions is a prefix of the one with 2E, for the scaling check.
* :func:`build_tiny_model` / :func:`build_4b_shaped_model` -- random models for the benchmark.
* :func:`lower_bound_work` -- the work a perfect per-video reuse needs (each distinct frame, MLLM image,
  prompt prefix, answer and decode once), computed from the videos and the decode plans.
* :func:`compare_run_dirs` -- are two evaluation work dirs' outputs identical.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from projects.sasasa2va.hf.models.frame_sampling import MODES, select_indices
from projects.sasasa2va.hf.models.inference import (
    InferenceOptions, build_prompt_text, canonical_boundary, token_id, tokenize_prompt,
)
from projects.sasasa2va.hf.models.templates import (
    IMG_CONTEXT_TOKEN, IMG_END_TOKEN, SEG_TOKEN, SPECIAL_TOKENS, eval_prompt, get_template, image_token_string,
    seg_answer,
)

COUNTERS = ("sam2_frames_encoded", "mllm_images_encoded", "tokens_prefilled", "tokens_decoded", "sam2_decodes")
# Re-wordings for the extra expressions of a video ({x}: an original expression of that video).
WORDINGS = (
    "{x} in this video",
    "the object described as {x}",
    "{x} throughout the clip",
    "only {x}",
    "{x}, all frames",
    "exactly {x}",
    "{x} from start to end",
    "the thing that is {x}",
    "{x} in the scene",
    "whatever is {x}",
    "{x} over time",
    "{x} in every frame",
)


# ============================================================================================ forced answer
def default_answer(num_clips: int = 10) -> str:
    """'Sure, Clip_1 [SEG], ..., Clip_N [SEG].' -- the trained answer form (one [SEG] per clip)."""
    return "Sure, " + seg_answer(num_clips)


class ForcedAnswer:
    """BENCHMARK-ONLY device: the LM head's logits get a bias that makes greedy decoding emit
    ``text`` + the template's stop word, token by token, whatever the weights.

    Everything else runs for real (prefill, each decoding step through the LLM, [SEG] hidden states,
    SAM2), so a random model costs what a trained one answering that text would. A forward hook on the
    output embedding adds the bias (to every row of a batch: batched decoding advances all rows in
    lock-step, one head call per step); the step counter restarts at every ``generate_answer`` /
    ``generate_answers`` call (instance attributes wrapping the model's methods). Never use it for
    real evaluation.
    ``remove()`` (or leaving the ``with`` block) restores the model.
    """

    def __init__(self, model, tokenizer, text: Optional[str] = None):
        text = default_answer(int(model.config.num_clips)) if text is None else text
        stop = get_template(model.config.template)["STOP_WORDS"][0]
        self.text = text + stop
        self.ids = [int(i) for i in tokenizer(self.text, add_special_tokens=False).input_ids]
        if not self.ids:
            raise ValueError(f"forced answer {self.text!r} encodes to no tokens")
        self.model = model
        self.step = 0
        self._seg_id = int(tokenizer.convert_tokens_to_ids(SEG_TOKEN))
        self._num_clips = int(model.config.num_clips)
        head = model.language_model.get_output_embeddings()
        self._handle = head.register_forward_hook(self._hook)
        original = model.generate_answer

        def generate_answer(*args, **kwargs):
            self.step = 0
            return original(*args, **kwargs)

        model.generate_answer = generate_answer
        original_many = getattr(model, "generate_answers", None)
        if original_many is not None:
            def generate_answers(*args, **kwargs):
                self.step = 0
                return original_many(*args, **kwargs)

            model.generate_answers = generate_answers

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_generated(self) -> int:
        """Tokens a video answer actually generates: all of them, or up to one past the ``num_clips``-th
        [SEG] (video generation stops there, ``generate_answer(max_seg_tokens=...)``)."""
        segs = [i for i, t in enumerate(self.ids) if t == self._seg_id]
        if len(segs) >= self._num_clips > 0:
            return min(len(self.ids), segs[self._num_clips - 1] + 2)
        return len(self.ids)

    @property
    def num_seg(self) -> int:
        return self.text.count(SEG_TOKEN)

    def _hook(self, module, args, output):
        token = self.ids[min(self.step, len(self.ids) - 1)]
        self.step += 1
        biased = output.clone()
        biased[..., token] = torch.finfo(biased.dtype).max
        return biased

    def remove(self) -> None:
        self._handle.remove()
        self.model.__dict__.pop("generate_answer", None)
        self.model.__dict__.pop("generate_answers", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class ObjectLikeMasks:
    """BENCHMARK-ONLY device: every upsampled mask logit map gets a fixed ellipse-shaped field added
    (+``strength`` inside, -``strength`` outside, a soft edge a few pixels wide where the model's own logits
    still move it), so a random model's outputs look like a trained model's confident object masks.

    Why: a random SAM2 answers logits near 0, i.e. probabilities near 0.5 whose thresholded masks are noise;
    storing them (RLE of the masks, deflated uint8 probabilities) costs ~10x an object mask's (40 frames of
    640x360 on this project's CPU VM: ~150 vs ~16 ms per output) and that per-output cost grows with the
    expressions. Only the content changes: every model computation still runs, the no-object veto (-1024)
    stays negative, and the naive and shared paths get the same field (their outputs stay comparable). Wraps
    ``grounding.upsample_logits`` as an instance attribute (``remove()`` or leaving the ``with`` block restores
    it). Never use it for real evaluation."""

    def __init__(self, model, strength: float = 12.0):
        self.grounding = model.grounding_encoder
        self.strength = float(strength)
        self._fields: dict = {}
        self._had = "upsample_logits" in self.grounding.__dict__
        self._saved = self.grounding.__dict__.get("upsample_logits")
        original = self.grounding.upsample_logits

        def upsample_logits(low_res, size, *args, **kwargs):
            out = original(low_res, size, *args, **kwargs)  # a fresh tensor: added to in place
            return out.add_(self.field(tuple(int(x) for x in size), out.device).to(out.dtype))

        self.grounding.upsample_logits = upsample_logits

    def field(self, size: tuple[int, int], device) -> torch.Tensor:
        """[H, W]: strength * clamp(4 (1 - r^2), -1, 1); r = 1 on an ellipse of half the frame's size."""
        key = (size, str(device))
        if key not in self._fields:
            h, w = size
            y = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2) / (h / 4)
            x = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2) / (w / 4)
            r2 = y[:, None] ** 2 + x[None, :] ** 2
            self._fields[key] = (self.strength * (4.0 * (1.0 - r2)).clamp(-1.0, 1.0)).to(device)
        return self._fields[key]

    def remove(self) -> None:
        if self._had:
            self.grounding.__dict__["upsample_logits"] = self._saved
        else:
            self.grounding.__dict__.pop("upsample_logits", None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class PhaseTimer:
    """Wall time per model phase during a run (outermost timed call only, so nothing is counted twice):
    ViT+mlp1 (``extract_feature``), prefix prefill (``build_prefix_cache``), generation (``generate_answer``
    / batched ``generate_answers``: the rest of the prompt + greedy decoding), SAM2 encoder (``encode``),
    SAM2 decoding / memory tracking (``decode`` / ``propagate``) and mask upsampling. On CUDA each timed
    call is synchronised. Wraps the methods as instance attributes while active (``with PhaseTimer(model)
    as t: ...; t.seconds``)."""

    PHASES = (("vision", "model", "extract_feature"), ("prefix_prefill", "model", "build_prefix_cache"),
              ("generate", "model", "generate_answer"), ("generate", "model", "generate_answers"),
              ("sam2_encode", "grounding", "encode"),
              ("sam2_decode", "grounding", "decode"), ("sam2_decode", "grounding", "propagate"),
              ("upsample", "grounding", "upsample_logits"))

    def __init__(self, model):
        self.model = model
        self.seconds = {name: 0.0 for name, _, _ in self.PHASES}
        self.calls = {name: 0 for name, _, _ in self.PHASES}
        self._active = 0
        self._saved = []
        try:
            self._cuda = next(model.parameters()).device.type == "cuda"
        except StopIteration:
            self._cuda = False

    def _wrap(self, name, fn):
        import time

        def timed(*args, **kwargs):
            if self._active:
                return fn(*args, **kwargs)
            self._active += 1
            if self._cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._cuda:
                    torch.cuda.synchronize()
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
                self._active -= 1

        return timed

    def __enter__(self):
        owners = {"model": self.model, "grounding": self.model.grounding_encoder}
        for name, owner, attr in self.PHASES:
            obj = owners[owner]
            if not callable(getattr(obj, attr, None)):
                continue
            had = attr in obj.__dict__
            self._saved.append((obj, attr, obj.__dict__.get(attr), had))
            setattr(obj, attr, self._wrap(name, getattr(obj, attr)))
        return self

    def __exit__(self, *exc):
        for obj, attr, old, had in reversed(self._saved):
            if had:
                obj.__dict__[attr] = old
            else:
                obj.__dict__.pop(attr, None)
        self._saved = []


def bias_object_score(model, value: float = 3.0) -> None:
    """BENCHMARK-ONLY: a random SAM2 object-score head vetoes arbitrary frames; bias it towards
    'present' so masks are not trivially empty (same trick as tests/test_inference.py)."""
    sam2 = model.grounding_encoder.sam2_model
    if getattr(sam2, "pred_obj_scores", False):
        with torch.no_grad():
            sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(value)


# ============================================================================================ data
@dataclass
class BenchSplit:
    name: str
    split_dir: str
    qframe_file: str
    num_videos: int
    exps_per_video: int
    frames: list = field(default_factory=list)  # frames per video

    def as_dict(self) -> dict:
        return asdict(self)


BENCH_DATA_MARKER = ".made_by_benchmark"


def _looks_like_bench_data(opts: dict) -> bool:
    """Generator options (synthetic_info.json) of benchmark data made before BENCH_DATA_MARKER existed:
    valid_u only (no train / valid), mevis + qframe."""
    return (opts.get("num_train_videos") == 0 and opts.get("num_valid_videos") == 0
            and sorted(opts.get("formats") or []) == ["mevis", "qframe"])


def make_bench_splits(root: str, num_videos: int, exps_per_video: Sequence[int], seed: int = 0,
                      min_frames: int = 12, max_frames: int = 24, sizes=((160, 96),)) -> dict[int, BenchSplit]:
    """Synthetic MeViS valid_u (``num_videos`` videos, regenerated only when the options change) and,
    for each E in ``exps_per_video``, a split ``<root>/valid_u_e<E>`` with exactly E expressions per
    video (see :func:`expand_split`). Only data this function made (its BENCH_DATA_MARKER) is ever
    replaced: ``<root>/synthetic`` holding other synthetic data (e.g. ``--work-dir .`` = the repo's
    data/synthetic) is used when its settings fit, else refused."""
    from projects.sasasa2va.datasets.synthetic import generate_all

    gen_root = os.path.join(root, "synthetic")
    info = os.path.join(gen_root, "synthetic_info.json")
    want = dict(num_valid_u_videos=num_videos, min_frames=min_frames, max_frames=max_frames,
                sizes=[f"{w}x{h}" for w, h in sizes])
    fresh, opts = True, {}
    if os.path.isfile(info):
        with open(info, "r", encoding="utf-8") as f:
            old = json.load(f)
        opts = old.get("options", {})
        fresh = any(opts.get(k) != v for k, v in want.items()) or old.get("summary", {}).get("seed") != seed
    if fresh:
        marker = os.path.join(gen_root, BENCH_DATA_MARKER)
        if os.path.exists(gen_root) and os.listdir(gen_root) and not os.path.isfile(marker) \
                and not _looks_like_bench_data(opts):
            raise ValueError(f"{gen_root}: holds data this benchmark did not make (with other settings); it "
                             f"regenerates only its own data -- choose another --work-dir")
        shutil.rmtree(gen_root, ignore_errors=True)
        os.makedirs(gen_root)
        with open(marker, "w", encoding="utf-8") as f:  # first: an interrupted generation stays the benchmark's
            f.write("made by projects.sasasa2va.evaluation.bench.make_bench_splits; replaced when its settings change\n")
        generate_all(gen_root, seed=seed, num_train_videos=0, num_valid_u_videos=num_videos, num_valid_videos=0,
                     min_frames=min_frames, max_frames=max_frames, sizes=tuple(sizes), formats=("mevis", "qframe"))
    return expand_split(os.path.join(gen_root, "mevis", "valid_u"),
                        os.path.join(gen_root, "mevis_q_frame", "valid_u", "selected_frames.json"),
                        root, exps_per_video, seed)


def expand_split(split_dir: str, qframe_file: Optional[str], root: str, exps_per_video: Sequence[int],
                 seed: int = 0, max_videos: Optional[int] = None) -> dict[int, BenchSplit]:
    """For each E: ``<root>/valid_u_e<E>`` = the split's videos (JPEGImages symlinked) with exactly E
    expressions each (+ selected_frames.json, + mask_dict.json when the split has one).

    Expression n of a video is original n % k (k originals; the first E when k >= E), re-worded by
    WORDINGS[n // k - 1] for n >= k, with the original's objects and, when re-worded, a fresh Q-frame
    list drawn like the synthetic generator's (visibility-weighted when masks are known). The split
    with fewer expressions is a prefix of a larger one.
    """
    from projects.sasasa2va.datasets.rle import decode_rle
    from projects.sasasa2va.datasets.synthetic import qframe_indices
    from projects.sasasa2va.utils.io import atomic_write_json

    with open(os.path.join(split_dir, "meta_expressions.json"), "r", encoding="utf-8") as f:
        meta = json.load(f)
    selected = {}
    if qframe_file and os.path.isfile(qframe_file):
        with open(qframe_file, "r", encoding="utf-8") as f:
            selected = json.load(f)
    mask_path = os.path.join(split_dir, "mask_dict.json")
    mask_dict = None
    if os.path.isfile(mask_path):
        with open(mask_path, "r", encoding="utf-8") as f:
            mask_dict = json.load(f)
    e_max = max(exps_per_video)
    full_meta: dict = {}
    full_sel: dict = {}
    frames_per_video = []
    videos = list(meta["videos"].items())[:max_videos]
    for vi, (vid, v) in enumerate(videos):
        keys = sorted(v["expressions"], key=lambda k: (len(k), k))
        originals = [(k, v["expressions"][k]) for k in keys]
        if not originals:
            raise ValueError(f"{split_dir}: video {vid!r} has no expressions")
        orig_sel = selected.get(vid, {}).get("selected_frames", {})
        num_frames = len(v["frames"])
        frames_per_video.append(num_frames)
        exps, sels = [], []
        for n in range(e_max):
            j, k = n % len(originals), n // len(originals)
            key, o = originals[j]
            if k == 0 and key in orig_sel:
                exps.append(dict(o))
                sels.append(list(orig_sel[key]))
                continue
            if k:
                if k - 1 >= len(WORDINGS):
                    raise ValueError(f"video {vid!r}: {e_max} expressions need more than {len(WORDINGS)} "
                                     f"re-wordings of its {len(originals)} expression(s)")
                o = {**o, "exp": WORDINGS[k - 1].format(x=o["exp"])}
            exps.append(dict(o))
            vis = [True] * num_frames
            if mask_dict is not None and o.get("anno_id"):
                vis = []
                for t in range(num_frames):
                    seen = False
                    for a in o["anno_id"]:
                        rle = mask_dict[str(a)][t]
                        if rle is not None and decode_rle(rle, *rle["size"]).any():
                            seen = True
                            break
                    vis.append(seen)
            sels.append(qframe_indices(vis, np.random.default_rng([seed, vi, n])))
        full_meta[vid] = (v["frames"], exps)
        full_sel[vid] = sels
    out = {}
    for e in exps_per_video:
        d = os.path.join(root, f"valid_u_e{e}")
        os.makedirs(d, exist_ok=True)
        link = os.path.join(d, "JPEGImages")
        target = os.path.abspath(os.path.join(split_dir, "JPEGImages"))
        if os.path.islink(link) and os.readlink(link) != target:
            os.unlink(link)
        if not os.path.exists(link):
            os.symlink(target, link)
        if mask_dict is not None:
            shutil.copyfile(mask_path, os.path.join(d, "mask_dict.json"))
        m = {"videos": {vid: {"frames": frames, "expressions": {str(i): x for i, x in enumerate(exps[:e])}}
                        for vid, (frames, exps) in full_meta.items()}}
        s = {vid: {"selected_frames": {str(i): q for i, q in enumerate(sels[:e])}} for vid, sels in full_sel.items()}
        atomic_write_json(os.path.join(d, "meta_expressions.json"), m)
        qf = os.path.join(d, "selected_frames.json")
        atomic_write_json(qf, s)
        out[e] = BenchSplit(f"BENCH_E{e}", d, qf, len(full_meta), e, frames_per_video)
    return out


# ============================================================================================ models
def build_tiny_model(cache_dir: str, device="cpu", dtype=torch.float32, template: str = "qwen_chat",
                     image_size: int = 112, seed: int = 0):
    """(chat model, tokenizer): the tiny random InternVL folder + [SEG] tokens + tiny SAM2, in eval mode
    (the tiny config's shapes: 112 px ViT, 16 tokens per image, 256 px SAM2)."""
    from projects.sasasa2va.models import tiny
    from projects.sasasa2va.models.builder import add_special_tokens, load_internvl_folder, load_sam2_checkpoint

    folder = os.path.join(cache_dir, tiny.INTERNVL_DIR)
    sam2 = os.path.join(cache_dir, tiny.SAM2_FILE)
    manifest = os.path.join(cache_dir, "tiny_manifest.json")
    ok = os.path.isfile(manifest) and os.path.isfile(sam2)
    if ok:
        with open(manifest, "r", encoding="utf-8") as f:
            m = json.load(f)
        ok = m.get("image_size") == image_size and m.get("seed") == seed and m.get("arch") == "qwen2"
    if not ok:
        tiny.make_tiny_pretrained(cache_dir, arch="qwen2", image_size=image_size, seed=seed, with_sa2va_pth=False)
    torch.manual_seed(seed)  # the parts not in the folder (text_hidden_fcs, new token rows) are seeded
    model, tok = load_internvl_folder(folder, {"name": "tiny"}, template=template, dtype=dtype)
    add_special_tokens(model, tok)
    load_sam2_checkpoint(model, sam2)
    model.config.sam2_image_size = model.grounding_encoder.image_size
    bias_object_score(model)
    return model.to(torch.device(device)).eval(), tok


# InternVL2.5-4B: InternViT-300M-448px + Qwen2.5-3B-shaped LLM; SAM2 hiera-L (Sa2VA-4B).
VIT_300M = dict(num_channels=3, patch_size=14, image_size=448, qkv_bias=True, hidden_size=1024,
                num_attention_heads=16, intermediate_size=4096, qk_normalization=False, num_hidden_layers=24,
                use_flash_attn=False, hidden_act="gelu", norm_type="layer_norm", layer_norm_eps=1e-6,
                dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                initializer_factor=1.0)
QWEN25_3B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=2048, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151674,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                 tie_word_embeddings=False, use_sliding_window=False, max_window_layers=70,
                 attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645)


def build_4b_shaped_model(tokenizer, device="cuda", dtype=torch.bfloat16, template: str = "phi3_chat",
                          seed: int = 0, num_layers: Optional[int] = None):
    """Random-init model with InternVL2.5-4B / Sa2VA-4B shapes, created directly on ``device`` in
    ``dtype`` (no host copy, no transformers init): parameters are filled with a cheap init (normal
    0.02 for matrices, 1 for norm/scale vectors, 0 for biases). ``tokenizer`` (e.g. the tiny one) gets
    the Sa2VA special tokens; the 151674-row vocabulary covers it (a shape benchmark, not a model).
    ``num_layers`` overrides the LLM depth (quick checks only)."""
    from transformers.modeling_utils import no_init_weights

    from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import SaSaSa2VAChatConfig
    from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import SaSaSa2VAChatModel
    from projects.sasasa2va.models.builder import default_dtype

    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    llm = dict(QWEN25_3B)
    if num_layers is not None:
        llm.update(num_hidden_layers=int(num_layers), max_window_layers=int(num_layers))
    if len(tokenizer) > llm["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the 4B vocab {llm['vocab_size']}")
    config = SaSaSa2VAChatConfig(vision_config=dict(VIT_300M), llm_config=llm, sam2_config={"name": "sam2_hiera_l"},
                                 template=template, downsample_ratio=0.5, force_image_size=448, ps_version="v2",
                                 dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                                 max_dynamic_patch=12, sam2_image_size=1024)
    config.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    config.seg_token_id = int(tokenizer(SEG_TOKEN, add_special_tokens=False).input_ids[0])
    config.torch_dtype = dtype
    device = torch.device(device)
    with torch.device(device), default_dtype(dtype), no_init_weights():
        model = SaSaSa2VAChatModel(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.config.sam2_image_size = model.grounding_encoder.image_size
    return model.eval(), tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ============================================================================================ lower bound
def lower_bound_work(model, tokenizer, records: dict, qframe: Optional[dict], modes: Sequence[str],
                     answer_tokens: int, num_seg: Optional[int] = None,
                     options: Optional[InferenceOptions] = None) -> dict:
    """The least work that computes every (expression, mode) of ``records`` with per-video reuse.

    Per video: every frame that any decode plan touches SAM2-encoded once; every distinct MLLM image
    (key frame / grid of a frame selection) through the ViT once; every distinct prompt prefix (the
    tokens up to the last ``</img>``, with its images) prefilled once and every distinct question
    suffix once per distinct prompt; every distinct answer (prompt tokens + images) decoded once
    (``answer_tokens - 1`` tokens fed back); for each answer, each distinct (frame, [SEG]) pair of its
    Path A/B plans decoded once, and each distinct Path C plan's conditioning frames once (twice when
    it also tracks backward). Assumes answers with ``num_seg`` (default num_clips) [SEG] tokens.
    Answers decoded together in a batch count as decoded once each (batching changes the time, not the
    work). The shared path meets the SAM2-decode bound through VideoContext's pair cache (on by
    default); without it it decodes each plan's distinct pairs.
    """
    from PIL import Image

    from projects.sasasa2va.hf.models.frame_sampling import seg_prompt_indices
    from projects.sasasa2va.hf.models.video_context import VideoContext

    options = options or InferenceOptions()
    cfg = model.config
    num_seg = cfg.num_clips if num_seg is None else num_seg
    order = seg_prompt_indices(num_seg, cfg.num_clips) or []
    img_end = token_id(tokenizer, IMG_END_TOKEN)
    total = {k: 0 for k in COUNTERS}
    for vid, rec in records.items():
        L = rec.num_frames
        blank = Image.new("RGB", (8, 8))
        ctx = VideoContext(model, tokenizer, [blank] * L)
        frames: set = set()
        images: set = set()
        prefixes: dict = {}
        gens: dict = {}
        pairs: dict = {}
        c_plans: dict = {}
        for exp_id, exp in rec.expressions.items():
            prompt = eval_prompt(exp.text)
            for mode in modes:
                fids = qframe[vid][exp_id] if mode == "q_frame" else None
                indices = select_indices(L, mode, cfg.num_sampled_frames, fids)
                specs = ctx.clip_image_specs(indices)
                keys = tuple(k for k, _ in specs)
                text = build_prompt_text(prompt, image_token_string(len(specs), model.num_image_token), cfg.template)
                ids = tokenize_prompt(tokenizer, text, "cpu")[0].tolist()
                b = canonical_boundary(torch.tensor([ids]), img_end)
                gkey = (tuple(ids), keys)
                if gkey not in gens:
                    gens[gkey] = len(ids) - b
                    prefixes.setdefault((tuple(ids[:b]), keys), b)
                    images.update(keys)
                if not order:
                    continue
                plan = ctx.plan_for(mode, indices, options)
                calls = [(f, order[k] if k < len(order) else k) for f, k in zip(plan.decode_frames, plan.prompt_index)]
                if plan.path == "C":
                    first, last = min(plan.decode_frames), max(plan.decode_frames)
                    c_plans[(gkey, tuple(calls))] = len(calls) * (2 if first > 0 else 1)
                    frames.update(range(first, L))
                    if first > 0:
                        frames.update(range(0, last + 1))
                else:
                    pairs.setdefault(gkey, set()).update(calls)
                    frames.update(int(f) for f in plan.decode_frames)
        total["sam2_frames_encoded"] += len(frames)
        total["mllm_images_encoded"] += len(images)
        total["tokens_prefilled"] += sum(prefixes.values()) + sum(gens.values())
        total["tokens_decoded"] += len(gens) * max(int(answer_tokens) - 1, 0)
        total["sam2_decodes"] += sum(len(p) for p in pairs.values()) + sum(c_plans.values())
    return total


def work_ratios(work: dict, bound: dict) -> dict:
    return {k: (work.get(k, 0) / bound[k]) if bound.get(k) else None for k in COUNTERS}


# ============================================================================================ comparison
def result_files(work_dir: str, modes: Sequence[str], averaged: bool) -> list[str]:
    """Relative paths of the results.json files of a run (per mode, plus the average)."""
    files = [os.path.join("modes", m, "results.json") for m in modes] if len(modes) > 1 or averaged \
        else ["results.json"]
    if averaged:
        files.append("results.json")
    return files


def _entry_agreement(ma: list, mb: list) -> tuple[int, int, int, int]:
    """(pixels, pixels that differ, intersection, union) of two entries' per-frame RLE masks, over all
    their frames; a frame missing on one side (or None there) counts as empty."""
    from projects.sasasa2va.datasets.rle import decode_rle, rle_size

    pixels = differ = inter = union = 0
    for i in range(max(len(ma), len(mb))):
        ra = ma[i] if i < len(ma) else None
        rb = mb[i] if i < len(mb) else None
        if ra is None and rb is None:
            continue
        h, w = rle_size(ra if ra is not None else rb)
        a = decode_rle(ra, h, w)
        b = decode_rle(rb, h, w)  # (another size: a DataError naming it)
        pixels += h * w
        differ += int(np.count_nonzero(a != b))
        inter += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    return pixels, differ, inter, union


def compare_run_dirs(a: str, b: str, files: Sequence[str]) -> dict:
    """Byte equality of each results.json and, entry by entry, equality of the predicted masks (RLE) and
    how far apart unequal ones are: each entry's IoU over all its frames (both empty: 1) and the share of
    pixels that differ -- on a GPU in bf16 the two paths are equal only up to rounding, and these say how
    much that moves the masks."""
    out = {"files_identical": True, "entries": 0, "entries_equal_masks": 0, "differing_files": [],
           "pixels": 0, "pixels_differing": 0, "mask_iou_mean": None, "mask_iou_min": None, "worst_entry": None}
    ious, worst = [], 1.0  # worst: the IoU of worst_entry (the first unequal entry with the lowest one)
    for rel in files:
        with open(os.path.join(a, rel), "rb") as f:
            ba = f.read()
        with open(os.path.join(b, rel), "rb") as f:
            bb = f.read()
        if ba != bb:
            out["files_identical"] = False
            out["differing_files"].append(rel)
        ja, jb = json.loads(ba), json.loads(bb)
        for vid, exps in ja.items():
            if vid.startswith("__"):
                continue
            for eid, e in exps.items():
                out["entries"] += 1
                other = jb.get(vid, {}).get(eid)
                ma = e.get("prediction_masks") or []
                mb = (other or {}).get("prediction_masks") or []
                if other is not None and mb == ma:
                    out["entries_equal_masks"] += 1
                    out["pixels"] += sum(int(np.prod(r["size"])) for r in ma if r is not None)
                    ious.append(1.0)
                    continue
                pixels, differ, inter, union = _entry_agreement(ma, mb)
                out["pixels"] += pixels
                out["pixels_differing"] += differ
                iou = inter / union if union else 1.0
                if out["worst_entry"] is None or iou < worst:
                    out["worst_entry"], worst = f"{rel} {vid}/{eid}", iou
                ious.append(iou)
    if ious:
        out["mask_iou_mean"] = float(np.mean(ious))
        out["mask_iou_min"] = float(min(ious))
    return out


__all__ = ["COUNTERS", "MODES", "ForcedAnswer", "BenchSplit", "make_bench_splits", "expand_split", "build_tiny_model",
           "build_4b_shaped_model", "lower_bound_work", "work_ratios", "compare_run_dirs", "result_files",
           "default_answer", "bias_object_score", "PhaseTimer", "count_parameters"]
