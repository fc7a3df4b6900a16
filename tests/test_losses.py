"""Mask losses vs direct computations (spec model_training_reference.md §3)."""
import pytest
import torch
import torch.nn.functional as F

from projects.sasasa2va.models.losses import (
    dice_loss,
    get_uncertain_point_coords_with_randomness,
    mask_losses,
    point_sample,
    sample_points,
    sigmoid_ce_loss,
)

EPS32 = torch.finfo(torch.float32).eps


def test_point_sample_hits_pixel_centres_and_interpolates():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    # pixel (row 1, col 2) centre is x=(2+0.5)/4, y=(1+0.5)/4
    centre = torch.tensor([[[2.5 / 4, 1.5 / 4]]])
    assert point_sample(img, centre).item() == pytest.approx(6.0)
    between = torch.tensor([[[2.0 / 4, 1.5 / 4]]])  # half-way between cols 1 and 2
    assert point_sample(img, between).item() == pytest.approx(5.5)
    assert point_sample(img.expand(2, 3, 4, 4), centre.expand(2, 5, 2)).shape == (2, 3, 5)


def test_uncertain_points_concentrate_on_the_boundary():
    x = (torch.arange(64) + 0.5) / 64
    logits = (40 * (x - 0.5)).expand(2, 1, 64, 64).contiguous()  # |logit| smallest at x = 0.5
    gen = torch.Generator().manual_seed(0)
    pts = get_uncertain_point_coords_with_randomness(logits, 400, 3.0, 0.75, generator=gen)
    assert pts.shape == (2, 400, 2)
    important, rest = pts[:, :300, 0], pts[:, 300:, 0]
    assert (important - 0.5).abs().max() < 0.2  # top-300 of 1200 uniform draws: |x-0.5| <~ 0.125
    assert (rest - 0.5).abs().max() > 0.3  # the 100 fresh uniform points are spread out
    assert ((pts >= 0) & (pts <= 1)).all()


def test_sample_points_gradients_and_soft_targets():
    pred = torch.randn(3, 1, 32, 32, requires_grad=True)
    gt = (torch.rand(3, 1, 32, 32) > 0.5).float()
    pts, tgt = sample_points(pred, gt, num_points=100, generator=torch.Generator().manual_seed(1))
    assert pts.shape == tgt.shape == (3, 100)
    assert not tgt.requires_grad and pts.requires_grad
    assert ((tgt >= 0) & (tgt <= 1)).all()
    pts.sum().backward()
    assert pred.grad.abs().sum() > 0


def test_dice_and_bce_match_direct_formulas():
    pred = torch.randn(4, 50)
    tgt = torch.rand(4, 50)
    p = pred.sigmoid()
    d = (2 * (p * tgt).sum(1) + 1.0) / (p.sum(1) + tgt.sum(1) + 1.0)
    expect_dice = 0.5 * (1 - d).sum() / (4 + 1e-4 + EPS32)
    assert dice_loss(pred, tgt, avg_factor=4 + 1e-4).item() == pytest.approx(expect_dice.item(), rel=1e-6)
    bce = -(tgt * F.logsigmoid(pred) + (1 - tgt) * F.logsigmoid(-pred))
    expect_bce = 2.0 * bce.sum() / (200 + 1e-4 + EPS32)
    assert sigmoid_ce_loss(pred, tgt, avg_factor=200 + 1e-4).item() == pytest.approx(expect_bce.item(), rel=1e-5)


def test_mask_losses_sampled_equals_manual_pipeline():
    pred = torch.randn(2, 16, 16)
    gt = (torch.rand(2, 16, 16) > 0.6).float()
    out = mask_losses(pred, gt, num_points=64, generator=torch.Generator().manual_seed(3))
    pts, tgt = sample_points(pred, gt, num_points=64, generator=torch.Generator().manual_seed(3))
    assert out["loss_mask"].item() == pytest.approx(
        sigmoid_ce_loss(pts, tgt, avg_factor=2 * 64 + 1e-4).item(), rel=1e-6)
    assert out["loss_dice"].item() == pytest.approx(dice_loss(pts, tgt, avg_factor=2 + 1e-4).item(), rel=1e-6)


def test_mask_losses_fallback_without_sampling():
    pred = torch.randn(2, 8, 8)
    gt = (torch.rand(2, 8, 8) > 0.5).float()
    out = mask_losses(pred, gt, sample=False)
    expect_bce = 2.0 * F.binary_cross_entropy_with_logits(pred, gt)
    p = pred.sigmoid().flatten(1)
    t = gt.flatten(1)
    expect_dice = 0.5 * (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
    assert out["loss_mask"].item() == pytest.approx(expect_bce.item(), rel=1e-6)
    assert out["loss_dice"].item() == pytest.approx(expect_dice.item(), rel=1e-6)
    with pytest.raises(ValueError):
        mask_losses(pred, gt[:1])


def test_perfect_prediction_has_small_losses():
    gt = torch.zeros(1, 32, 32)
    gt[:, 8:24, 8:24] = 1
    pred = (gt * 2 - 1) * 30
    out = mask_losses(pred, gt, num_points=256, generator=torch.Generator().manual_seed(0))
    bad = mask_losses(-pred, gt, num_points=256, generator=torch.Generator().manual_seed(0))
    assert out["loss_dice"] < bad["loss_dice"] and out["loss_mask"] < bad["loss_mask"]
