"""Stand-in for the pretrained Sa2VA checkpoint that SaSaSa2VA fine-tunes (tiny model, synthetic world).

Why: the real system starts from an MLLM whose [SEG] states already name the referred object (InternVL
pretraining + Sa2VA training). The random-init tiny MLLM's [SEG] states are dominated by what every
sample shares (template, image tokens, clip index): a linear probe measured the target's colour at 11 %
of their variance. SAM2's decoder then learns to ignore its prompt, no gradient teaches the LLM to read
the question, and the model never segments by language (issue #9; README "What the quickstart does").

This stage gives the tiny MLLM that ability before the real training starts. On the training config's
own samples (KFC images, spec questions and answers) it trains the ViT, mlp1 and LLM to say a word
naming the referred object right after each [SEG] (``... Clip_3 [SEG] red, ...``), with the LM head
frozen, so the [SEG] state itself has to point at that word (a trainable head could absorb it instead).
The word is the expression's own colour word when it has one, else its shape word, else the colour
under the target's ground-truth mask (motion-only expressions teach the ViT/LLM to look); targets of
mixed colour get no word. After 200 steps of 8 samples the colour explains ~60 % of the [SEG] states'
variance (11 % before; ~35 % when shape-only expressions also got the pixel colour, which scored lower
end to end: README). The tiny config then keeps the LLM body frozen: its
[SEG] states keep the colour, and the trainable LM head learns the spec answers without the words.
SAM2 and text_hidden_fcs keep the checkpoint's weights, except that the prompt head's last Linear is
scaled (``prompt_scale``) so SAM2's prompt token starts as large as the decoder's own tokens. The result
overwrites the config's ``pretrained_pth`` (a Sa2VA-style .pth); ``stand_in_pretraining.json`` beside it
records the run.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Optional, Sequence

import torch

from ..datasets.synthetic import COLORS, SHAPES, text_words
from ..utils.io import atomic_write_json

MARKER = "stand_in_pretraining.json"
PALETTE_NAMES = tuple(COLORS)


def marker_path(pth: str) -> str:
    """The record beside a stand-in-pretrained .pth (its presence: the .pth is pretrained)."""
    return os.path.join(os.path.dirname(os.path.abspath(pth)), MARKER)


def pending_paths(pth: str) -> tuple[str, str]:
    """(the pretrained weights before they replace ``pth``, the marker before it is final): the end of a
    pretraining writes the first, then the second, renames the first over ``pth``, then the second to the
    marker -- so a kill between the two renames is told apart from one before them."""
    return pth + ".tmp", marker_path(pth) + ".pending"


def finish_cut_short_save(pth: str) -> Optional[str]:
    """Settle a pretraining whose last renames a kill cut short: "completed" (the weights had replaced
    ``pth``: the marker is put in place), "discarded" (they had not: ``pth`` still holds the weights the
    pretraining started from, so it is run again) or None (nothing pending). Run before the marker is read."""
    tmp, pending = pending_paths(pth)
    if not os.path.isfile(pending):
        return None
    if os.path.exists(tmp):
        os.remove(tmp)
        os.remove(pending)
        return "discarded"
    os.replace(pending, marker_path(pth))
    return "completed"


def target_colours(masks: torch.Tensor, frames: Sequence[torch.Tensor], frames_per_object: int,
                   min_share: float = 0.6) -> list[Optional[str]]:
    """Palette colour under each object's ground-truth mask (all its frames), or None when the masked
    pixels are absent or not one colour (plural targets of different colours).

    ``masks`` [K*F, h, w] object-major; ``frames`` the F SAM2 frames (uint8 [3, S, S]).
    """
    if frames_per_object < 1 or masks.shape[0] % frames_per_object:
        raise ValueError(f"target_colours: {masks.shape[0]} masks are not a multiple of {frames_per_object} frames")
    if len(frames) != frames_per_object:
        raise ValueError(f"target_colours: {len(frames)} frames for {frames_per_object} frames per object")
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    votes = []
    for k in range(masks.shape[0] // frames_per_object):
        count = torch.zeros(len(palette))
        for t in range(frames_per_object):
            frame = frames[t].float()
            m = torch.nn.functional.interpolate(masks[k * frames_per_object + t][None, None].float(),
                                                size=frame.shape[-2:], mode="nearest")[0, 0] > 0.5
            if m.any():
                pixels = frame[:, m].T  # [n, 3]
                nearest = torch.cdist(pixels, palette).argmin(1)
                count += torch.bincount(nearest, minlength=len(palette)).float()
        total = float(count.sum())
        best = int(count.argmax())
        votes.append(PALETTE_NAMES[best] if total > 0 and count[best] / total >= min_share else None)
    return votes


def _single_word_in(text: str, vocabulary: Sequence[str]) -> Optional[str]:
    words = text_words(text)
    hits = [w for w in vocabulary if w in words]
    return hits[0] if len(hits) == 1 else None


def colour_word_in(text: str) -> Optional[str]:
    """The single palette colour named in ``text`` (None for none or several)."""
    return _single_word_in(text, PALETTE_NAMES)


def shape_word_in(text: str) -> Optional[str]:
    """The single shape named in ``text`` ("circle", ...; plurals do not count; None for none or several)."""
    return _single_word_in(text, SHAPES)


def seg_question_tokens(input_ids: Sequence[int], tokenizer, seg_id: int, skip_ids=None) -> list[list[int]]:
    """For each [SEG] of a conversation: the token ids of the user turn it answers, without ``skip_ids``
    (default: the image tokens <img>, </img>, <IMG_CONTEXT>)."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if skip_ids is None:
        skip_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    ids = [int(t) for t in input_ids]
    out, current, in_user = [], [], False
    for j, t in enumerate(ids):
        if t == im_start:
            in_user = tokenizer.decode(ids[j + 1:j + 2]).strip() == "user"
            current = [] if in_user else current
        elif t == im_end:
            in_user = False
        elif t == seg_id:
            out.append(list(current))
        elif in_user and t not in skip_ids:
            current.append(t)
    return out


def seg_questions(input_ids: Sequence[int], tokenizer, seg_id: int) -> list[str]:
    """For each [SEG]: the text of the user turn it answers (image tokens dropped)."""
    return [tokenizer.decode(q) for q in seg_question_tokens(input_ids, tokenizer, seg_id)]


def seg_words(sample: dict, tokenizer, seg_id: int) -> list[Optional[str]]:
    """The word each [SEG] of a dataset sample is trained to point at: the question's colour word, else
    its shape word, else the colour under the target's mask, else None."""
    f = int(sample["frames_per_batch"])
    questions = seg_questions(sample["input_ids"], tokenizer, seg_id)
    frames = sample["g_pixel_values"]
    frames = list(frames) if isinstance(frames, (list, tuple)) else [frames]  # image samples: one tensor
    pixel = target_colours(sample["masks"], frames, f)
    return [colour_word_in(q) or shape_word_in(q) or pixel[j // f] for j, q in enumerate(questions)]


def scale_last_linear(module: torch.nn.Module, factor: float) -> torch.nn.Linear:
    """Multiply the last nn.Linear of ``module`` (weight and bias) by ``factor`` in place; returns it."""
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise ValueError(f"scale_last_linear: {type(module).__name__} has no nn.Linear")
    with torch.no_grad():
        last[-1].weight.mul_(factor)
        if last[-1].bias is not None:
            last[-1].bias.mul_(factor)
    return last[-1]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the environment
        return None
    return tqdm(total=total, desc="stand-in pretraining", unit="step", dynamic_ncols=True)


def insert_after_seg(input_ids: Sequence[int], labels: Sequence[int], seg_id: int,
                     words: Sequence[Optional[Sequence[int]]]) -> tuple[list[int], list[int]]:
    """Insert ``words[j]`` (token ids, supervised) right after the j-th [SEG]; None inserts nothing."""
    if len(input_ids) != len(labels):
        raise ValueError(f"insert_after_seg: {len(input_ids)} input ids but {len(labels)} labels")
    n_seg = sum(1 for t in input_ids if int(t) == seg_id)
    if n_seg != len(words):
        raise ValueError(f"insert_after_seg: {n_seg} [SEG] tokens but {len(words)} entries in words")
    ids_out, lab_out, j = [], [], 0
    for t, y in zip(input_ids, labels):
        ids_out.append(int(t))
        lab_out.append(int(y))
        if int(t) == seg_id:
            extra = list(words[j] or [])
            ids_out += extra
            lab_out += extra
            j += 1
    return ids_out, lab_out


def relabel_after_seg(input_ids: Sequence[int], labels: Sequence[int], seg_id: int,
                      words: Sequence[Optional[int]]) -> list[int]:
    """Labels in which the token after the j-th [SEG] is ``words[j]`` (one token id; None keeps it): the
    [SEG] position learns to predict the word while the input stays the spec answer."""
    if len(input_ids) != len(labels):
        raise ValueError(f"relabel_after_seg: {len(input_ids)} input ids but {len(labels)} labels")
    pos = [j for j, t in enumerate(input_ids) if int(t) == seg_id]
    if len(pos) != len(words):
        raise ValueError(f"relabel_after_seg: {len(pos)} [SEG] tokens but {len(words)} entries in words")
    out = [int(y) for y in labels]
    for j, w in zip(pos, words):
        if w is None:
            continue
        if j + 1 >= len(out):
            raise ValueError(f"relabel_after_seg: the [SEG] at position {j} is the last token; nothing to relabel")
        out[j + 1] = int(w)
    return out


WORD_TARGETS = ("insert", "relabel")


def check_word_target(word_target: str) -> str:
    """``word_target`` itself, or a ValueError naming the choices."""
    if word_target not in WORD_TARGETS:
        raise ValueError(f"stand-in pretraining: word_target must be one of {WORD_TARGETS}, got {word_target!r}")
    return word_target


def echo_sample(sample: dict, tokenizer, seg_id: int, word_target: str = "insert") -> tuple[dict, int, int]:
    """The sample with its target's word (``seg_words``) as what each [SEG] predicts; returns (sample,
    [SEG] tokens named, [SEG] tokens).

    ``insert`` (default): the word is inserted after each [SEG] (``Clip_3 [SEG] red, Clip_4 ...``), so
    later [SEG]s see earlier words in their context, which the spec answers of the main training lack.
    ``relabel``: the input stays the spec answer and only the label after each [SEG] becomes the word,
    so the [SEG] states trained here are the ones the main training and evaluation meet (README: more
    of the word in those states, end-to-end results within the seed spread).
    """
    check_word_target(word_target)
    names = seg_words(sample, tokenizer, seg_id)
    words = [tokenizer.encode(" " + c, add_special_tokens=False) if c else None for c in names]
    named = sum(w is not None for w in words)
    if word_target == "insert":
        ids, labels = insert_after_seg(sample["input_ids"], sample["labels"], seg_id, words)
        return dict(sample, input_ids=ids, labels=labels), named, len(words)
    for c, w in zip(names, words):
        if w is not None and len(w) != 1:
            raise ValueError(f"word_target='relabel' needs one token per word; {c!r} is {len(w)} tokens {w}")
    labels = relabel_after_seg(sample["input_ids"], sample["labels"], seg_id, [w[0] if w else None for w in words])
    return dict(sample, labels=labels), named, len(words)


def run_stand_in_pretraining(cfg, steps: int = 200, accumulate: int = 8, lr: float = 1e-3,
                             num_objects: int = 1, prompt_scale: float = 6.0, seed: int = 0,
                             word_target: str = "insert", out_pth: Optional[str] = None, log_every: int = 25,
                             progress: bool = True) -> dict:
    """Train the tiny MLLM as described above and write it into ``out_pth`` (default: the config's
    ``model.pretrained_pth``) plus ``<folder>/stand_in_pretraining.json``; returns that record."""
    from mmengine.logging import print_log
    from mmengine.registry import MODELS

    from ..datasets.collate import sasasa2va_collate_fn
    from ..datasets.refvos import build_object
    from .builder import hf_key_to_sa2va

    if steps < 1 or accumulate < 1 or num_objects < 1 or lr <= 0 or prompt_scale <= 0:
        raise ValueError(f"stand-in pretraining: need steps, accumulate, num_objects >= 1 and lr, prompt_scale > 0; "
                         f"got {steps}, {accumulate}, {num_objects}, {lr}, {prompt_scale}")
    out_pth = out_pth or cfg.model.get("pretrained_pth")
    if not out_pth:
        raise ValueError("stand-in pretraining: the config has no model.pretrained_pth and no out_pth was given")
    if not os.path.isfile(out_pth):
        raise FileNotFoundError(f"stand-in pretraining starts from {out_pth} (the random tiny Sa2VA .pth); create it "
                                "first with tools/make_tiny_pretrained.py")
    marker = marker_path(out_pth)
    finish_cut_short_save(out_pth)
    if os.path.isfile(marker):  # pretraining it again would also scale the prompt head again
        raise ValueError(f"{out_pth} is already stand-in-pretrained ({marker}); start again from random weights "
                         "with tools/pretrain_tiny.py --force")
    check_word_target(word_target)  # before building the model
    random.seed(seed)
    torch.manual_seed(seed)
    model_cfg = dict(cfg.model)
    model_cfg.update(dtype="float32", lora=None, freeze_vision=False, freeze_llm=False, train_mlp1=True,
                     train_embeddings="none", pretrained_pth=out_pth)
    model = MODELS.build(model_cfg)
    chat = model.model
    chat.requires_grad_(False)
    for part in (chat.vision_model, chat.mlp1, chat.language_model):
        part.requires_grad_(True)
    head = chat.language_model.get_output_embeddings()
    if head is None:
        raise ValueError("stand-in pretraining freezes the LM head, but this LLM has no output embedding")
    head.requires_grad_(False)  # the [SEG] state itself has to point at the word (a trainable head could absorb it)
    params = [p for p in chat.parameters() if p.requires_grad]
    datasets = []
    for d in cfg.train_dataloader.dataset.datasets:
        d = dict(d)
        if "num_objects" in d:
            d["num_objects"] = num_objects
        datasets.append(build_object(d))
    sizes = [len(d) for d in datasets]
    if not sum(sizes):
        raise ValueError("stand-in pretraining: the config's training datasets are empty")
    tokenizer, seg_id = model.tokenizer, model.seg_token_id
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    chat.train()
    bar = _progress(steps, progress)
    history, named, total, t0 = [], 0, 0, time.time()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(accumulate):
            k = rng.choices(range(len(datasets)), weights=sizes)[0]
            sample, n_named, n_total = echo_sample(datasets[k][rng.randrange(sizes[k])], tokenizer, seg_id,
                                                    word_target)
            named, total = named + n_named, total + n_total
            data = sasasa2va_collate_fn([sample])["data"]
            out = chat(input_ids=data["input_ids"], pixel_values=torch.cat(data["pixel_values"]).float(),
                       labels=data["labels"])
            loss = out.loss
            (loss / accumulate).backward()
            loss_sum += float(loss.detach()) / accumulate
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(loss_sum)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}")
        if step % log_every == 0 or step == steps:
            recent = history[-log_every:]
            print_log(f"stand-in pretraining step {step}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                      f"{time.time() - t0:.0f} s", logger="current")
    if bar is not None:
        bar.close()
    scale_last_linear(chat.text_hidden_fcs, prompt_scale)
    state = {hf_key_to_sa2va(k): v.detach().clone().contiguous() for k, v in chat.state_dict().items()}
    first = sum(history[:log_every]) / len(history[:log_every])
    last = sum(history[-log_every:]) / len(history[-log_every:])
    record = {"pth": out_pth, "steps": steps,
              "accumulate": accumulate, "lr": lr, "num_objects": num_objects, "prompt_scale": prompt_scale,
              "seed": seed, "loss_first": round(first, 4), "loss_last": round(last, 4),
              "seg_tokens_named": named, "seg_tokens": total, "word_target": word_target,
              "seconds": round(time.time() - t0, 1)}
    tmp, pending = pending_paths(out_pth)  # (see finish_cut_short_save: the order matters)
    torch.save(state, tmp)
    atomic_write_json(pending, record, indent=2)
    os.replace(tmp, out_pth)
    os.replace(pending, marker)
    return record
