"""SaSaSa2VA training model: the chat model wrapped as an mmengine ``BaseModel`` (loss mode only).

Spec model_training.md §3 / model_training_reference.md §1.9-1.12, §2-3. The forward runs the MLLM with
hidden states, projects the last-layer state at every [SEG] input position, regroups the per-sample
[SEG] rows object-major -> per frame (frame t of a sample gets clip t of each object), encodes the SAM2
frames once and decodes every (frame, object) pair, then adds point-sampled BCE + Dice to the LM loss.

Differences from the reference, on purpose:
* [SEG]/frame/mask counts are validated with errors that name the sample (the reference truncated
  silently); ``text_hidden_fcs`` runs on the [SEG] rows only (pitfall 18).
* the added-token rows of the embedding / LM head can be trained (pitfall 13) as separate small
  parameters (``train_embeddings='new'``), so the frozen rows get neither gradients nor weight decay
  and the checkpoint stays small; ``'all'`` trains whole matrices, ``'lm_head'`` only the output matrix
  (the tiny config: its frozen, stand-in-pretrained LLM keeps its [SEG] states while the head learns the
  answer format), ``'none'`` is the reference.
* ``state_dict()`` holds only trainable tensors; loading reports what was loaded and accepts the
  reference key layout (``mllm.model.*``, top-level ``grounding_encoder.*`` / ``text_hidden_fcs.*``).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModel
from torch import nn

from projects.sasasa2va.hf.models.sam2_grounding import FrameFeatures
from projects.sasasa2va.hf.models.templates import IGNORE_INDEX, SPECIAL_TOKENS
from projects.sasasa2va.models.builder import (
    add_special_tokens,
    load_internvl_folder,
    load_sa2va_pth,
    load_sam2_checkpoint,
)
from projects.sasasa2va.models.lora import apply_lora, lora_target_names, merge_lora
from projects.sasasa2va.models.losses import (
    IMPORTANCE_SAMPLE_RATIO,
    NUM_POINTS,
    OVERSAMPLE_RATIO,
    mask_losses,
)

EMBEDDING_MODES = ("none", "new", "all", "lm_head")
# Reference training-checkpoint prefixes -> ours (reference §1.1 / §1.11).
REFERENCE_PREFIXES = (
    ("mllm.model.", "model."),
    ("grounding_encoder.", "model.grounding_encoder."),
    ("text_hidden_fcs.", "model.text_hidden_fcs."),
)


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """'auto' -> bfloat16 when CUDA is available, else float32 (spec: CPU float32, CUDA bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto', a torch.dtype or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


class NewTokenRows(nn.Module):
    """Trainable copies of the added-token rows of the input embedding and LM head.

    Forward hooks substitute these rows into the (frozen) embedding output and LM-head logits, so
    gradients and optimizer state touch only the new rows. With tied embeddings one copy serves both.
    ``merge_into`` writes the rows back and removes the hooks (export).
    """

    def __init__(self, language_model: nn.Module, token_ids: Sequence[int]):
        super().__init__()
        emb = language_model.get_input_embeddings()
        head = language_model.get_output_embeddings()
        ids = torch.tensor(sorted({int(i) for i in token_ids}), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("NewTokenRows: no token ids given")
        if int(ids.max()) >= emb.num_embeddings:
            raise ValueError(f"NewTokenRows: token id {int(ids.max())} outside the embedding ({emb.num_embeddings} rows)")
        lookup = torch.full((emb.num_embeddings,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(ids.numel())
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.embed = nn.Parameter(emb.weight.detach()[ids].clone().float())
        self.tied = head is None or head.weight is emb.weight
        self.head = None if self.tied else nn.Parameter(head.weight.detach()[ids].clone().float())
        self._embedding, self._head_module = emb, head
        self._handles = [emb.register_forward_hook(self._embed_hook)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head_hook))

    def _embed_hook(self, module, args, output):
        ids = args[0]
        rows = self.lookup.to(ids.device)[ids]
        new = self.embed[rows.clamp(min=0)].to(output.dtype)  # always in the graph (same graph every rank)
        return torch.where((rows >= 0).unsqueeze(-1), new, output)

    def _head_hook(self, module, args, output):
        hidden = args[0]
        weight = self.embed if self.tied else self.head
        logits = F.linear(hidden, weight.to(hidden.dtype))
        if getattr(module, "bias", None) is not None:
            logits = logits + module.bias[self.token_ids]
        return output.index_copy(-1, self.token_ids.to(output.device), logits.to(output.dtype))

    @torch.no_grad()
    def merge_into(self) -> None:
        """Write the trained rows into the embedding / head weights and detach the hooks."""
        emb = self._embedding
        emb.weight[self.token_ids.to(emb.weight.device)] = self.embed.to(emb.weight)
        if not self.tied:
            head = self._head_module
            head.weight[self.token_ids.to(head.weight.device)] = self.head.to(head.weight)
        for handle in self._handles:
            handle.remove()
        self._handles = []


class SaSaSa2VAModel(BaseModel):
    """Training wrapper around ``SaSaSa2VAChatModel`` (attribute ``model``); see the module docstring.

    Build order (reference §1.10): InternVL folder -> special tokens + resize -> SAM2 checkpoint ->
    Sa2VA .pth -> freezing -> LoRA -> new-token rows -> gradient checkpointing -> summary log.
    """

    def __init__(
        self,
        mllm_path: str,
        template: str,
        sam2_config: Union[str, Mapping] = "sam2_hiera_l",
        sam2_ckpt: Optional[str] = None,
        pretrained_pth: Optional[str] = None,
        pretrained_allow_missing: Sequence[str] = (),
        special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
        lora: Optional[Mapping] = None,
        freeze_vision: bool = True,
        freeze_llm: bool = True,
        train_mlp1: bool = True,
        train_sam2_decoder: bool = True,
        train_sam2_encoder: bool = False,
        train_embeddings: str = "new",
        loss_mask_weight: float = 2.0,
        loss_dice_weight: float = 0.5,
        llm_loss_weight: float = 1.0,
        num_points: int = NUM_POINTS,
        sample_points: bool = True,
        oversample_ratio: float = OVERSAMPLE_RATIO,
        importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
        num_objects: Optional[int] = 5,
        dtype: Union[str, torch.dtype] = "auto",
        keep_trainable_fp32: bool = True,
        gradient_checkpointing: bool = False,
        sam2_chunk_size: int = 8,
        trust_remote_code: bool = False,
        extra_config: Optional[Mapping] = None,
        data_preprocessor: Optional[Mapping] = None,
        init_cfg: Optional[Mapping] = None,
        preprocessor=None,  # accepted and ignored: the reference configs pass it (pitfall 1)
    ):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if train_embeddings is True or train_embeddings is False:
            train_embeddings = "all" if train_embeddings else "none"
        if train_embeddings not in EMBEDDING_MODES:
            raise ValueError(f"train_embeddings must be one of {EMBEDDING_MODES}, got {train_embeddings!r}")
        if lora is not None and not freeze_llm:
            raise ValueError("lora and freeze_llm=False together: LoRA freezes the base LLM; pick one")
        self.template = template
        self.compute_dtype = resolve_dtype(dtype)
        self.loss_mask_weight = float(loss_mask_weight)
        self.loss_dice_weight = float(loss_dice_weight)
        self.llm_loss_weight = float(llm_loss_weight)
        self.num_points = int(num_points)
        self.sample_points = bool(sample_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.num_objects = None if num_objects is None else int(num_objects)
        self.sam2_chunk_size = int(sam2_chunk_size)
        self.train_sam2_encoder = bool(train_sam2_encoder)

        chat, tokenizer = load_internvl_folder(
            mllm_path, sam2_config, template, dtype=self.compute_dtype, extra_config=dict(extra_config or {}),
            trust_remote_code=trust_remote_code,
        )
        self.tokenizer = tokenizer
        self.seg_token_id = add_special_tokens(chat, tokenizer, list(special_tokens))
        if sam2_ckpt:
            load_sam2_checkpoint(chat, sam2_ckpt)
        chat.config.sam2_image_size = chat.grounding_encoder.image_size
        chat.config.template = template
        self.pretrained_report = None
        if pretrained_pth:
            self.pretrained_report = load_sa2va_pth(chat, pretrained_pth, allow_missing=tuple(pretrained_allow_missing))
            print_log(self.pretrained_report.summary(), logger="current")
        chat.language_model.config.use_cache = False
        self.model = chat

        # freezing (reference §1.12), then the parts this config trains
        chat.requires_grad_(False)
        chat.vision_model.requires_grad_(not freeze_vision)
        chat.mlp1.requires_grad_(bool(train_mlp1))
        chat.text_hidden_fcs.requires_grad_(True)
        chat.grounding_encoder.sam2_model.sam_mask_decoder.requires_grad_(bool(train_sam2_decoder))
        chat.grounding_encoder.sam2_model.image_encoder.requires_grad_(self.train_sam2_encoder)
        chat.language_model.requires_grad_(not freeze_llm)
        if gradient_checkpointing:
            chat.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            lora = dict(lora)
            chat.language_model = apply_lora(
                chat.language_model, r=int(lora.get("r", 128)), alpha=int(lora.get("lora_alpha", lora.get("alpha", 256))),
                dropout=float(lora.get("lora_dropout", lora.get("dropout", 0.05))), targets=lora.get("target_modules"),
                include_internlm2_output=bool(lora.get("include_internlm2_output", False)),
            )
            print_log(f"LoRA targets: {sorted(lora_target_names(chat.language_model))}", logger="current")
        self.new_tokens = None
        if train_embeddings == "all":
            chat.language_model.get_input_embeddings().requires_grad_(True)
            head = chat.language_model.get_output_embeddings()
            if head is not None:
                head.requires_grad_(True)
        elif train_embeddings == "lm_head":
            head = chat.language_model.get_output_embeddings()
            tied = getattr(chat.language_model.config, "tie_word_embeddings", False)
            if head is None or tied:
                raise ValueError(f"train_embeddings='lm_head' needs an untied output embedding; {mllm_path} has "
                                 f"{'none' if head is None else 'tie_word_embeddings=True'}")
            chat.language_model.get_input_embeddings().requires_grad_(False)
            head.requires_grad_(True)
        elif train_embeddings == "new" and freeze_llm:
            ids = tokenizer.convert_tokens_to_ids(list(special_tokens))
            self.new_tokens = NewTokenRows(chat.language_model, ids)
        if keep_trainable_fp32 and self.compute_dtype != torch.float32:
            for p in self.parameters():  # fp32 master weights for the non-DeepSpeed (AMP) path
                if p.requires_grad:
                    p.data = p.data.float()
        self.register_load_state_dict_pre_hook(self._remap_reference_keys)
        self.register_load_state_dict_post_hook(self._report_load)
        self.last_load_report: Optional[dict] = None
        self.log_parameter_summary()

    # ------------------------------------------------------------------ parameter bookkeeping
    def _group(self, name: str) -> str:
        if name.startswith("new_tokens."):
            return "new-token rows"
        name = name[len("model."):] if name.startswith("model.") else name
        if "lora_" in name:
            return "LLM LoRA"
        for prefix, group in (("vision_model.", "vision_model"), ("mlp1.", "mlp1"),
                              ("text_hidden_fcs.", "text_hidden_fcs"),
                              ("grounding_encoder.sam2_model.sam_mask_decoder.", "SAM2 mask decoder"),
                              ("grounding_encoder.sam2_model.image_encoder.", "SAM2 image encoder"),
                              ("grounding_encoder.", "SAM2 other"), ("language_model.", "LLM")):
            if name.startswith(prefix):
                return group
        return "other"

    def parameter_summary(self) -> "OrderedDict[str, list]":
        """group -> [trainable params, frozen params] (each tensor counted once)."""
        out: "OrderedDict[str, list]" = OrderedDict()
        for name, p in self.named_parameters():
            entry = out.setdefault(self._group(name), [0, 0])
            entry[0 if p.requires_grad else 1] += p.numel()
        return out

    def log_parameter_summary(self) -> None:
        rows = self.parameter_summary()
        total_t = sum(v[0] for v in rows.values())
        total_f = sum(v[1] for v in rows.values())
        lines = [f"{'group':<20} {'trainable':>14} {'frozen':>14}"]
        lines += [f"{g:<20} {t:>14,} {f:>14,}" for g, (t, f) in rows.items()]
        lines.append(f"{'total':<20} {total_t:>14,} {total_f:>14,}  "
                     f"({100.0 * total_t / max(1, total_t + total_f):.2f}% trainable)")
        print_log("SaSaSa2VAModel parameters:\n" + "\n".join(lines), logger="current")

    def trainable_keys(self) -> set:
        """State-dict keys of the trainable tensors (all names of shared tensors)."""
        return {name for name, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the trainable tensors (LoRA, mlp1, mask decoder, text_hidden_fcs, trained embeddings ...)."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + k for k in self.trainable_keys()}
        for key in [k for k in full if k.startswith(prefix) and k not in keep]:
            del full[key]
        return full

    def all_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """Every tensor of the model, trainable or not."""
        return super().state_dict()

    def load_state_dict(self, state_dict, strict: bool = False, assign: bool = False):
        """Tolerant load of a (trainable-subset) checkpoint; ``self.last_load_report`` says what loaded.

        Frozen tensors absent from the file are not 'missing'. ``strict=True`` raises on missing
        trainable tensors, unexpected keys and shape mismatches.
        """
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ValueError(f"load_state_dict: {len(result.missing_keys)} trainable tensors missing "
                             f"{result.missing_keys[:20]}, {len(result.unexpected_keys)} unexpected "
                             f"{result.unexpected_keys[:20]}")
        return result

    def _remap_reference_keys(self, module, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Accept the reference layout (``mllm.model.*`` etc.) and remember which keys were offered."""
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for old, new in REFERENCE_PREFIXES:
                if rest.startswith(old) and not rest.startswith("model."):
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break
        self._offered = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}

    def _report_load(self, module, incompatible) -> None:
        """Drop frozen tensors from ``missing_keys`` (in place, also under mmengine's loader) and log."""
        trainable = self.trainable_keys()
        frozen_missing = [k for k in incompatible.missing_keys if k not in trainable]
        for key in frozen_missing:
            incompatible.missing_keys.remove(key)
        offered = getattr(self, "_offered", set())
        loaded = sorted(offered - set(incompatible.unexpected_keys))
        groups: "OrderedDict[str, int]" = OrderedDict()
        for key in loaded:
            groups[self._group(key)] = groups.get(self._group(key), 0) + 1
        self.last_load_report = {"loaded": loaded, "missing": list(incompatible.missing_keys),
                                 "unexpected": list(incompatible.unexpected_keys), "groups": dict(groups)}
        msg = (f"SaSaSa2VAModel.load_state_dict: loaded {len(loaded)} tensors "
               f"({', '.join(f'{g}: {n}' for g, n in groups.items()) or 'none'}); "
               f"missing trainable: {len(incompatible.missing_keys)}; unexpected: {len(incompatible.unexpected_keys)}")
        level = logging.WARNING if incompatible.missing_keys or incompatible.unexpected_keys else logging.INFO
        if incompatible.missing_keys:
            msg += f"\n  missing: {incompatible.missing_keys[:20]}"
        if incompatible.unexpected_keys:
            msg += f"\n  unexpected: {incompatible.unexpected_keys[:20]}"
        print_log(msg, logger="current", level=level)

    # ------------------------------------------------------------------ export
    def export_chat_model(self):
        """-> (SaSaSa2VAChatModel with LoRA and new-token rows merged into plain modules, tokenizer).

        Modifies this model in place (the LLM is no longer a PeftModel); build a fresh one to train again.
        """
        chat = self.model
        if self.new_tokens is not None:
            self.new_tokens.merge_into()
            self.new_tokens = None
        chat.language_model = merge_lora(chat.language_model)
        chat.config.llm_config = chat.language_model.config
        chat.config.llm_config.use_cache = True
        chat.config.llm_config.vocab_size = chat.language_model.get_input_embeddings().num_embeddings
        if getattr(chat.language_model, "is_gradient_checkpointing", False):
            chat.language_model.gradient_checkpointing_disable()
        chat.requires_grad_(False)
        for p in chat.parameters():
            p.data = p.data.to(self.compute_dtype)
        chat.eval()
        return chat, self.tokenizer

    # ------------------------------------------------------------------ forward
    def _autocast(self, device: torch.device):
        """bf16/fp16 autocast on CUDA (trainable fp32 + frozen half weights); nothing on CPU."""
        if device.type == "cuda" and self.compute_dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def forward(self, data: dict, data_samples=None, mode: str = "loss"):
        if mode != "loss":
            raise NotImplementedError(f"SaSaSa2VAModel.forward supports mode='loss' only (got {mode!r}); "
                                      "use export_chat_model().predict_forward for inference")
        with self._autocast(data["input_ids"].device):
            return self._loss(dict(data))

    def _loss(self, data: dict) -> dict:
        chat = self.model
        g_pixel_values = data.pop("g_pixel_values", None)
        masks = data.pop("masks", None)
        frames_per_batch = data.pop("frames_per_batch", None)
        input_ids = data["input_ids"]
        labels = data.get("labels")
        pixel_values = data.get("pixel_values")
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat([p.reshape(-1, *p.shape[-3:]) for p in pixel_values]) if pixel_values else None
        out = chat(input_ids=input_ids, pixel_values=pixel_values, attention_mask=data.get("attention_mask"),
                   position_ids=data.get("position_ids"), labels=labels, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        seg_valid = masks is not None and g_pixel_values is not None and frames_per_batch is not None
        if seg_valid:
            lang, gt, images = self._seg_inputs(input_ids, hidden, g_pixel_values, masks, frames_per_batch)
        else:
            lang, gt, images = self._dummy_inputs(input_ids, hidden)
        features = self._encode(images)
        pred = chat.grounding_encoder.decode_train(features, lang)  # [F, K, h, w] float32
        losses = mask_losses(
            pred.flatten(0, 1), gt.flatten(0, 1).to(pred.dtype), num_points=self.num_points,
            sample=self.sample_points, loss_mask_weight=self.loss_mask_weight,
            loss_dice_weight=self.loss_dice_weight, oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
        )
        if not seg_valid:  # same graph as a real batch, no contribution
            losses = {k: v * 0.0 for k, v in losses.items()}
        llm_loss = out.loss
        if labels is None or not bool((labels[:, 1:] != IGNORE_INDEX).any()):
            llm_loss = out.logits.float().sum() * 0.0  # nothing supervised: CE would be NaN
        return {"loss_mask": losses["loss_mask"], "loss_dice": losses["loss_dice"],
                "llm_loss": llm_loss * self.llm_loss_weight}

    def _project(self, rows: torch.Tensor) -> torch.Tensor:
        fcs = self.model.text_hidden_fcs
        return fcs(rows.to(fcs[0].weight.dtype) if not torch.is_autocast_enabled() else rows)

    def _seg_inputs(self, input_ids, hidden, g_pixel_values, masks, frames_per_batch):
        """[SEG] rows -> (lang [F,K,C], gt [F,K,h,w], images [F,3,S,S]) with every count checked."""
        seg_mask = input_ids == self.seg_token_id
        counts = seg_mask.sum(1).tolist()
        emb = self._project(hidden[seg_mask])
        per_sample = emb.split(counts)
        with_seg = [i for i, c in enumerate(counts) if c > 0]
        fpb = [int(f) for f in frames_per_batch]
        if not (len(with_seg) == len(fpb) == len(masks)):
            raise ValueError(
                f"SaSaSa2VAModel: {len(with_seg)} samples contain [SEG] (id {self.seg_token_id}; per-sample "
                f"counts {counts}) but the batch has {len(fpb)} frames_per_batch entries and {len(masks)} mask "
                "tensors; every sample with masks needs its [SEG] tokens (tokenizer/special-token mismatch or "
                "truncated answer?)")
        if sum(fpb) != len(g_pixel_values):
            raise ValueError(f"SaSaSa2VAModel: frames_per_batch {fpb} sums to {sum(fpb)} but "
                             f"{len(g_pixel_values)} g_pixel_values were given")
        low = self.model.grounding_encoder.low_res_size
        langs, gts = [], []
        for k, i in enumerate(with_seg):
            n, f, m = counts[i], fpb[k], masks[k]
            if f < 1 or n % f:
                raise ValueError(f"SaSaSa2VAModel: sample {i} has {n} [SEG] tokens, not a multiple of its {f} "
                                 f"SAM2 frames (expected objects x frames, object-major)")
            if m.dim() != 3 or m.shape[0] != n:
                raise ValueError(f"SaSaSa2VAModel: sample {i} has masks of shape {tuple(m.shape)}; expected "
                                 f"[{n}, H, W] = {n // f} objects x {f} frames for its {n} [SEG] tokens")
            objs = n // f
            lang = per_sample[i].view(objs, f, -1).transpose(0, 1)  # [f, K, C]: frame t <- clip t of each object
            gt = F.interpolate(m[None].float(), size=(low, low), mode="nearest")[0]
            gt = gt.view(objs, f, low, low).transpose(0, 1)
            lang, gt = self._fix_objects(lang, gt)
            langs.append(lang)
            gts.append(gt)
        images = list(g_pixel_values)
        if len({x.shape[1] for x in langs}) != 1:
            raise ValueError(f"SaSaSa2VAModel: samples have different object counts "
                             f"{[x.shape[1] for x in langs]}; set num_objects to equalise them")
        return torch.cat(langs), torch.cat(gts), images

    def _fix_objects(self, lang, gt):
        """Reference check_obj_number: exactly ``num_objects`` per frame (random subset / tiling)."""
        n = self.num_objects
        objs = lang.shape[1]
        if n is None or objs == n:
            return lang, gt
        if objs > n:
            idx = torch.stack([torch.randperm(objs, device=lang.device)[:n] for _ in range(lang.shape[0])])
        else:
            idx = (torch.arange(n, device=lang.device) % objs).expand(lang.shape[0], n)
        lang = torch.gather(lang, 1, idx[..., None].expand(-1, -1, lang.shape[-1]))
        gt = torch.gather(gt, 1, idx[..., None, None].expand(-1, -1, *gt.shape[-2:]).to(gt.device))
        return lang, gt

    def _dummy_inputs(self, input_ids, hidden):
        """No-mask batch: one black frame per sample prompted by its first positions' states."""
        batch = input_ids.shape[0]
        objs = self.num_objects or 1
        pos = torch.arange(objs, device=hidden.device) % hidden.shape[1]
        lang = self._project(hidden[:, pos].reshape(batch * objs, -1)).view(batch, objs, -1)
        size, low = self.model.grounding_encoder.image_size, self.model.grounding_encoder.low_res_size
        images = torch.zeros(batch, 3, size, size, dtype=torch.uint8, device=hidden.device)
        gt = torch.zeros(batch, objs, low, low, device=hidden.device)
        return lang, gt, images

    def _encode(self, images) -> FrameFeatures:
        """SAM2 features of all frames at once. ``images``: [N,3,H,W] or a list of [3,H,W] frames on the
        0..255 scale (uint8 from the datasets); each is resized if needed and normalised."""
        grounding = self.model.grounding_encoder
        dtype = grounding.sam2_model.no_mem_embed.dtype
        if isinstance(images, torch.Tensor):
            x = grounding.preprocess(images, dtype=dtype)
        else:
            for g in images:
                if g.dim() != 3 or g.shape[0] != 3:
                    raise ValueError(f"SaSaSa2VAModel: g_pixel_values entries must be [3,H,W], got {tuple(g.shape)}")
            x = torch.cat([grounding.preprocess(g[None], dtype=dtype) for g in images])
        if not self.train_sam2_encoder:
            return grounding.encode(x, chunk_size=self.sam2_chunk_size)
        # trainable image encoder (tiny configs): same as SAM2Grounding._encode_chunk but with autograd
        model = grounding.sam2_model
        out = model.image_encoder(x)
        fpn, pos = out["backbone_fpn"], out["vision_pos_enc"]
        dec = model.sam_mask_decoder
        return FrameFeatures((dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1])), fpn[2], pos[2][:1].clone())
