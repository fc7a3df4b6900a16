"""Mask losses of the SAM2 head (spec model_training_reference.md §3).

Mask2Former-style point sampling (12544 points/mask: 75 % most uncertain of 3x oversampled, 25 %
uniform), then mmdet's naive Dice (eps 1.0, weight 0.5) and sigmoid BCE (weight 2.0), each averaged
with mmdet's ``avg_factor`` rule ``sum / (avg_factor + float32 eps)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_POINTS = 12544  # 112 ** 2
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75
LOSS_MASK_WEIGHT = 2.0
LOSS_DICE_WEIGHT = 0.5
_EPS32 = torch.finfo(torch.float32).eps


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear sample [M,C,H,W] maps at [M,P,2] (x, y) coords in [0,1] -> [M,C,P] (mmcv semantics:
    grid_sample with align_corners=False, so 0 and 1 are the outer pixel edges, zero padding)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


def _rand(shape, device, generator) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=generator)


def get_uncertain_point_coords_with_randomness(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[M,1,H,W] logits -> [M,num_points,2] coords: the most uncertain (-|logit| at the sampled point,
    not at the pixels) of ``num_points*oversample_ratio`` uniform draws, plus fresh uniform points."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError("point sampling: need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1")
    m, device = mask_logits.shape[0], mask_logits.device
    coords = _rand((m, int(num_points * oversample_ratio), 2), device, generator)
    uncertainty = -point_sample(mask_logits, coords)[:, 0].abs()
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        picked = torch.cat([picked, _rand((m, num_random, 2), device, generator)], dim=1)
    return picked


def sample_points(pred: torch.Tensor, gt: torch.Tensor, num_points: int = NUM_POINTS,
                  oversample_ratio: float = OVERSAMPLE_RATIO,
                  importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
                  generator: torch.Generator | None = None):
    """pred logits / gt masks [M,1,h,w] (or [M,h,w]) -> (pred points, soft targets), both [M,P] in
    pred's dtype. Coordinates and targets carry no gradient; pred points do (sampled in float32)."""
    pred = pred[:, None] if pred.dim() == 3 else pred
    gt = gt[:, None] if gt.dim() == 3 else gt
    if pred.shape != gt.shape:
        raise ValueError(f"sample_points: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ")
    with torch.no_grad():
        coords = get_uncertain_point_coords_with_randomness(
            pred.float(), num_points, oversample_ratio, importance_sample_ratio, generator)
        targets = point_sample(gt.to(pred.dtype).float(), coords)[:, 0]
    points = point_sample(pred.float(), coords)[:, 0]
    return points.to(pred.dtype), targets.to(pred.dtype)


def _reduce(per_item: torch.Tensor, avg_factor: float | None) -> torch.Tensor:
    """mmdet weight_reduce_loss with reduction='mean': plain mean, or sum / (avg_factor + eps32)."""
    if avg_factor is None:
        return per_item.mean()
    return per_item.sum() / (avg_factor + _EPS32)


def dice_loss(pred_logits: torch.Tensor, target: torch.Tensor, avg_factor: float | None = None,
              eps: float = 1.0, loss_weight: float = LOSS_DICE_WEIGHT) -> torch.Tensor:
    """Naive Dice on sigmoid(pred) per mask: 1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps)."""
    p = pred_logits.sigmoid().flatten(1)
    t = target.flatten(1).float()
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return loss_weight * _reduce(1 - dice, avg_factor)


def sigmoid_ce_loss(pred_logits: torch.Tensor, target: torch.Tensor, avg_factor: float | None = None,
                    loss_weight: float = LOSS_MASK_WEIGHT) -> torch.Tensor:
    """Element-wise BCE-with-logits against (soft) targets, reduced like mmdet CrossEntropyLoss."""
    loss = F.binary_cross_entropy_with_logits(pred_logits.flatten(), target.flatten().float(), reduction="none")
    return loss_weight * _reduce(loss, avg_factor)


def mask_losses(pred_logits: torch.Tensor, gt_masks: torch.Tensor, num_points: int = NUM_POINTS,
                sample: bool = True, loss_mask_weight: float = LOSS_MASK_WEIGHT,
                loss_dice_weight: float = LOSS_DICE_WEIGHT, oversample_ratio: float = OVERSAMPLE_RATIO,
                importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
                generator: torch.Generator | None = None) -> dict:
    """pred logits / gt [M,h,w] -> {'loss_mask', 'loss_dice'} (weights applied).

    sample=True (the reference): losses on the sampled points, Dice avg_factor M + 1e-4, BCE
    avg_factor M*P + 1e-4. sample=False (unused fallback): BCE mean over all pixels, Dice mean over masks.
    """
    if pred_logits.shape != gt_masks.shape or pred_logits.dim() != 3:
        raise ValueError(f"mask_losses: pred {tuple(pred_logits.shape)} and gt {tuple(gt_masks.shape)} "
                         "must both be [M,h,w]")
    if not sample:
        gt = gt_masks.to(pred_logits.dtype)
        return {"loss_mask": sigmoid_ce_loss(pred_logits, gt, loss_weight=loss_mask_weight),
                "loss_dice": dice_loss(pred_logits, gt, loss_weight=loss_dice_weight)}
    points, targets = sample_points(pred_logits, gt_masks, num_points, oversample_ratio,
                                    importance_sample_ratio, generator)
    m = points.shape[0]
    return {"loss_mask": sigmoid_ce_loss(points, targets, avg_factor=m * points.shape[1] + 1e-4,
                                         loss_weight=loss_mask_weight),
            "loss_dice": dice_loss(points, targets, avg_factor=m + 1e-4, loss_weight=loss_dice_weight)}
