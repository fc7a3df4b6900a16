#!/usr/bin/env python
"""Where does the tiny model's learning stall? Train the tiny config's grounding path with a chosen
source of SAM2 prompts and print the teacher-forced mIoU on synthetic valid_u as it goes.

    python tools/diagnose_tiny.py --prompt model          # the real path: [SEG] states of the MLLM
    python tools/diagnose_tiny.py --prompt oracle-colour  # target colour read off the GT pixels
    python tools/diagnose_tiny.py --prompt oracle-word    # colour word found in the expression text
    python tools/diagnose_tiny.py --prompt bow            # learned bag of words of the question
    [--iters 300] [--lr 1e-3] [--eval-every 100] [--full-mask-loss] [--sam2-hidden 128] [--threads 1]
    [--prompt-scale 6]   # initial size of the SAM2 prompt token (x the default init)
    [--oracle-offset 7] [--oracle-clip-noise 1.7]   # give oracle prompts the MLLM prompts' make-up
    [--model-after 150]  # oracle prompts for 150 steps (SAM2 learns to follow them), then the real path

Why: issue #9 (the quickstart must segment by language) fails with near-empty masks. Replacing the
MLLM by prompts that carry the target's identity separates the two halves: if SAM2 learns with an
oracle prompt but not with the MLLM's, the bottleneck is getting the expression into the [SEG] states.
Oracle runs train only SAM2 (+ its text_hidden_fcs-like prompt head); ``model`` trains the full
SaSaSa2VAModel as the config does (without mmengine's runner: plain AdamW + one-cycle schedule).
Data and checkpoints: the tiny config's paths (``data/synthetic``, ``pretrained/tiny``), relative to
the working directory. Teacher-forced mIoU: the ground-truth conversation is fed (no generation),
masks of the 10 key frames x 5 expressions of each of the first ``--eval-samples`` valid_u videos are
thresholded at 0 and compared at SAM2's low resolution; the same with the 5 expressions' prompts rolled
(each object decoded with another expression's prompt) is a language-blind control. Last line:
``teacher_forced_miou <x> rolled_prompts_miou <y>``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.models.stand_in_pretraining import (  # noqa: E402
    scale_last_linear, seg_question_tokens as user_question_tokens)

TINY_CONFIG = os.path.join(ROOT, "projects", "sasasa2va", "configs", "sasasa2va_tiny.py")
PROMPTS = ("model", "oracle-colour", "oracle-word", "bow")
MEVIS_INDEX = 4  # the MeViS entry of the tiny config's dataset list
FIRST_VIDEO_DATASET = 3  # entries before this are image datasets (RefCOCO/+/g)


def add_offsets(lang, num_frames: int, offset, clip_noise, offset_scale: float, clip_scale: float):
    """Oracle prompts [K*F, C] (object-major) plus a fixed vector and a fixed vector per clip.

    Both are scaled relative to the prompts' own spread in the sample (norm of the per-dim std), so
    ``offset_scale`` / ``clip_scale`` say how large the shared part / the clip-position part is next to
    the target-dependent part, as measured on the MLLM's [SEG] prompts.
    """
    if clip_scale and len(clip_noise) < num_frames:
        raise ValueError(f"add_offsets: {len(clip_noise)} clip vectors for {num_frames} frames")
    spread = lang.detach().std(0).norm().clamp(min=1e-6)
    objs = lang.shape[0] // num_frames
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    out = lang
    if offset_scale:
        out = out + offset_scale * spread * unit(offset)
    if clip_scale:
        out = out + clip_scale * spread * unit(clip_noise[:num_frames]).repeat(objs, 1)
    return out


def colour_of_target(masks, frames, num_frames: int, palette):
    """Palette index of each (object, frame) target from the mean GT pixel colour; len(palette) if absent."""
    import torch
    import torch.nn.functional as F

    out = []
    for k in range(masks.shape[0]):
        frame = frames[k % num_frames].float()
        m = F.interpolate(masks[k][None, None].float(), size=frame.shape[-2:], mode="nearest")[0, 0] > 0.5
        if not m.any():
            out.append(len(palette))
            continue
        rgb = frame[:, m].mean(1)
        out.append(int(((palette - rgb[None]) ** 2).sum(1).argmin()))
    return torch.tensor(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", choices=PROMPTS, default="model", help="source of the SAM2 prompts")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=12, help="valid_u videos used for the mIoU")
    p.add_argument("--full-mask-loss", action="store_true",
                   help="BCE + Dice on every low-res pixel instead of the reference's sampled points")
    p.add_argument("--sam2-hidden", type=int, default=None,
                   help="SAM2 width (random init; default: the tiny config's sam2_hidden_dim, 128)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="samples per optimizer step (gradient accumulation; --iters counts steps)")
    p.add_argument("--prompt-scale", type=float, default=1.0,
                   help="multiply the initial weights of the prompt head's last Linear (text_hidden_fcs on "
                        "the model path, the oracle head otherwise, both with --model-after) by this factor")
    p.add_argument("--oracle-offset", type=float, default=0.0,
                   help="oracle prompts only: add a fixed random vector this many times their spread")
    p.add_argument("--oracle-clip-noise", type=float, default=0.0,
                   help="oracle prompts only: add a fixed random vector per clip, this many times their spread")
    p.add_argument("--model-after", type=int, default=None,
                   help="oracle prompts only: train with them for this many steps, then switch to the model "
                        "path (everything trainable from the start); EVAL then reports both paths")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.iters, args.eval_every, args.eval_samples, args.accumulate) < 1:
        p.error("--iters, --eval-every, --eval-samples and --accumulate must be >= 1")
    if min(args.oracle_offset, args.oracle_clip_noise) < 0 or args.prompt_scale <= 0:
        p.error("--oracle-offset and --oracle-clip-noise must be >= 0 and --prompt-scale > 0")
    if args.prompt == "model" and (args.oracle_offset or args.oracle_clip_noise):
        p.error("--oracle-offset / --oracle-clip-noise apply to oracle prompts, not --prompt model")
    if args.model_after is not None and (args.prompt == "model" or not 0 <= args.model_after < args.iters):
        p.error("--model-after needs an oracle --prompt and 0 <= K < --iters")

    import torch
    import torch.nn as nn
    from mmengine.config import Config
    from mmengine.registry import MODELS

    from projects.sasasa2va.datasets.collate import sasasa2va_collate_fn
    from projects.sasasa2va.datasets.refvos import build_object
    from projects.sasasa2va.datasets.synthetic import COLORS
    from projects.sasasa2va.hf.models.templates import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
    from projects.sasasa2va.models.losses import mask_losses
    from tools.benchmark_train import ensure_config_imports

    torch.set_num_threads(args.threads)
    ensure_config_imports()
    cfg = Config.fromfile(TINY_CONFIG)
    cfg.model.dtype = "float32"
    if args.sam2_hidden:
        cfg.model.sam2_config = dict(name="tiny", hidden_dim=args.sam2_hidden)
        cfg.model.sam2_ckpt = None
        cfg.model.pretrained_pth = None
    for path in (cfg.data_root, cfg.tiny_root):
        if not os.path.isdir(path):
            p.error(f"{path} not found (run from the repo root after `make data` and "
                    f"`python tools/make_tiny_pretrained.py --out {cfg.tiny_root}`)")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = MODELS.build(cfg.model)
    datasets = [build_object(d) for d in cfg.train_dataloader.dataset.datasets[FIRST_VIDEO_DATASET:]]
    valid_cfg = dict(cfg.train_dataloader.dataset.datasets[MEVIS_INDEX])
    split = os.path.join(cfg.data_root, "mevis", "valid_u")
    valid_cfg.update(image_folder=os.path.join(split, "JPEGImages"),
                     expression_file=os.path.join(split, "meta_expressions.json"),
                     mask_file=os.path.join(split, "mask_dict.json"), seed=123)
    valid = build_object(valid_cfg)
    valid_batches = [sasasa2va_collate_fn([valid[i]])["data"] for i in range(min(args.eval_samples, len(valid)))]
    tokenizer = valid.tokenizer
    seg_id = model.seg_token_id
    skip = {tokenizer.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)}
    grounding = model.model.grounding_encoder
    width = grounding.sam2_model.sam_prompt_encoder.embed_dim
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    names = list(COLORS)
    oracle = None
    if args.prompt != "model":
        n_in = len(tokenizer) + 1 if args.prompt == "bow" else len(names) + 1
        oracle = nn.ModuleDict({"embed": nn.Embedding(n_in, 256),
                                "head": nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, width))})
    fixed = torch.randn(1 + 64, width, generator=torch.Generator().manual_seed(args.seed + 1))
    if args.prompt_scale != 1.0:  # every prompt head that will feed SAM2
        if oracle is None or args.model_after is not None:
            scale_last_linear(model.model.text_hidden_fcs, args.prompt_scale)
        if oracle is not None:
            scale_last_linear(oracle["head"], args.prompt_scale)

    use_model = [oracle is None]  # which path prompts_and_targets takes (switches with --model-after)

    def prompts_and_targets(data):
        """(lang [F, K, C], gt [F, K, h, w], frames) of one collated sample."""
        if use_model[0]:
            out = model.model(input_ids=data["input_ids"], pixel_values=torch.cat(data["pixel_values"]),
                              output_hidden_states=True)
            return model._seg_inputs(data["input_ids"], out.hidden_states[-1], data["g_pixel_values"],
                                     data["masks"], data["frames_per_batch"])
        frames = list(data["g_pixel_values"])
        f = int(data["frames_per_batch"][0])
        masks = data["masks"][0]
        if args.prompt == "oracle-colour":
            emb = oracle["embed"](colour_of_target(masks, frames, f, palette))
        else:
            questions = user_question_tokens(data["input_ids"][0], tokenizer, seg_id, skip)
            if args.prompt == "bow":
                emb = torch.stack([oracle["embed"](torch.tensor(q or [len(tokenizer)])).mean(0) for q in questions])
            else:
                idx = []
                for q in questions:
                    words = set(tokenizer.decode(q).lower().replace("?", " ").replace(".", " ").split())
                    hit = [i for i, c in enumerate(names) if c in words]
                    idx.append(hit[0] if len(hit) == 1 else len(names))
                emb = oracle["embed"](torch.tensor(idx))
        lang = add_offsets(oracle["head"](emb), f, fixed[0], fixed[1:], args.oracle_offset, args.oracle_clip_noise)
        objs = lang.shape[0] // f
        low = grounding.low_res_size
        gt = torch.nn.functional.interpolate(masks[None].float(), size=(low, low), mode="nearest")[0]
        return lang.view(objs, f, -1).transpose(0, 1), gt.view(objs, f, low, low).transpose(0, 1), frames

    def losses_of(data):
        lang, gt, frames = prompts_and_targets(data)
        pred = grounding.decode_train(model._encode(frames), lang)
        out = mask_losses(pred.flatten(0, 1), gt.flatten(0, 1), num_points=model.num_points,
                          sample=not args.full_mask_loss, loss_mask_weight=model.loss_mask_weight,
                          loss_dice_weight=model.loss_dice_weight)
        return out

    def iou(pred, gt):
        inter = (pred & gt).flatten(2).sum(-1).float()
        union = (pred | gt).flatten(2).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean().item()

    @torch.no_grad()
    def evaluate() -> tuple:
        """(mIoU, mIoU with the prompts of the K expressions rolled by one within each frame): the
        second is a language-blind control; their gap is what the prompts contribute."""
        model.eval()
        right, rolled = [], []
        for data in valid_batches:
            lang, gt, frames = prompts_and_targets(data)
            features = model._encode(frames)
            gtb = gt > 0.5
            right.append(iou(grounding.decode_train(features, lang) > 0, gtb))
            rolled.append(iou(grounding.decode_train(features, lang.roll(1, dims=1)) > 0, gtb))
        model.train()
        return sum(right) / len(right), sum(rolled) / len(rolled)

    if oracle is None or args.model_after is not None:
        params = [q for q in model.parameters() if q.requires_grad] + ([] if oracle is None else list(oracle.parameters()))
    else:
        for q in model.parameters():
            q.requires_grad_(False)
        for q in grounding.parameters():
            q.requires_grad_(True)
        params = [q for q in grounding.parameters()] + list(oracle.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iters, pct_start=0.05)
    model.sample_points = not args.full_mask_loss
    sizes = [len(d) for d in datasets]
    rng = random.Random(args.seed)
    print(f"prompt={args.prompt} iters={args.iters} lr={args.lr} full_mask_loss={args.full_mask_loss} "
          f"accumulate={args.accumulate} prompt_scale={args.prompt_scale} oracle_offset={args.oracle_offset} "
          f"oracle_clip_noise={args.oracle_clip_noise} sam2_hidden={width} trainable={sum(q.numel() for q in params):,}", flush=True)
    t0, window, miou, blind = time.time(), [], float("nan"), float("nan")
    for it in range(1, args.iters + 1):
        opt.zero_grad(set_to_none=True)
        totals: dict = {}
        for _ in range(args.accumulate):
            k = rng.choices(range(len(datasets)), weights=sizes)[0]
            data = sasasa2va_collate_fn([datasets[k][rng.randrange(sizes[k])]])["data"]
            use_model[0] = oracle is None or (args.model_after is not None and it > args.model_after)
            losses = model(dict(data), mode="loss") if use_model[0] else losses_of(data)
            (sum(losses.values()) / args.accumulate).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / args.accumulate
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(totals)
        if it % 25 == 0:
            avg = {k: sum(w[k] for w in window) / len(window) for k in window[-1]}
            window = []
            print(f"it {it} {time.time() - t0:.0f}s " + " ".join(f"{k} {v:.3f}" for k, v in avg.items()), flush=True)
        if it % args.eval_every == 0 or it == args.iters:
            if args.model_after is not None:
                use_model[0] = False
                o_miou, o_blind = evaluate()
                print(f"     oracle prompts: mIoU {o_miou:.3f} (rolled {o_blind:.3f})", flush=True)
                use_model[0] = True
            miou, blind = evaluate()
            path = "model path " if args.model_after is not None else ""
            print(f"EVAL it {it} {time.time() - t0:.0f}s {path}teacher-forced mIoU {miou:.3f} "
                  f"(prompts rolled across expressions: {blind:.3f})", flush=True)
    print(f"teacher_forced_miou {miou:.4f} rolled_prompts_miou {blind:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
