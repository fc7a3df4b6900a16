"""SAM2 grounding glue: tiny build, encode/decode, veto, gradients, state-dict names, Path C."""
import numpy as np
import pytest
import torch

from projects.sasasa2va.hf.models.sam2_grounding import (
    NO_OBJ_SCORE,
    FrameFeatures,
    SAM2Grounding,
    official_sam2_state_dict,
    propagate_with_memory,
    sam2_config_preset,
)


def _tiny(seed=0):
    """Tiny trunk with hiera-L's heads (multimask, object score): exercises the faithful glue paths."""
    torch.manual_seed(seed)
    return SAM2Grounding({"name": "tiny", "reference_heads": True}).eval()


def test_tiny_default_preset_single_mask_without_object_score():
    """The random-init tiny preset drops the untrained-head behaviours (see _TINY_FLAGS)."""
    cfg = sam2_config_preset("tiny")
    assert cfg["multimask_output_in_sam"] is False and cfg["pred_obj_scores"] is False
    assert sam2_config_preset("tiny", {"reference_heads": True})["pred_obj_scores"] is True
    torch.manual_seed(0)
    g = SAM2Grounding("tiny").eval()
    feats = g.encode(g.preprocess(torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)))
    prompts = torch.randn(3, g.hidden_dim)
    out = g.decode(feats, torch.tensor([0, 1, 1]), prompts, mode="infer")
    assert out.shape == (3, g.low_res_size, g.low_res_size)
    assert torch.isfinite(out).all() and (out > -1000).all()  # no object-score veto


def _frames(n, size=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _force_object_score(model, value):
    """Set the object-score head so every decode says 'object' (value > 0) or 'no object' (< 0)."""
    last = model.sam2_model.sam_mask_decoder.pred_obj_score_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def feats(tiny):
    with torch.no_grad():
        return tiny.encode(tiny.preprocess(_frames(4)), chunk_size=3)


def test_tiny_preset_is_consistent_and_serialisable():
    import json

    cfg = sam2_config_preset("tiny", {"image_size": 128, "memory_attention.num_layers": 1})
    json.dumps(cfg)
    assert cfg["image_size"] == 128 and cfg["memory_attention"]["num_layers"] == 1
    assert cfg["memory_attention"]["layer"]["self_attention"]["feat_sizes"] == [8, 8]
    g = SAM2Grounding({"name": "tiny", "image_size": 128})
    assert (g.hidden_dim, g.image_size, g.low_res_size) == (64, 128, 32)
    with pytest.raises(ValueError):
        sam2_config_preset("nope")


def test_preprocess_and_encode_shapes(tiny, feats):
    x = tiny.preprocess(_frames(1, size=100))
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    ref = tiny.preprocess(_frames(1))
    raw = _frames(1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(ref, (raw - mean) / std, atol=1e-6)
    assert len(feats) == 4
    assert feats.feat_sizes == [(64, 64), (32, 32), (16, 16)]
    assert feats.high_res[0].shape == (4, 8, 64, 64) and feats.high_res[1].shape == (4, 16, 32, 32)
    assert feats.low.shape == (4, 64, 16, 16) and feats.pos.shape == (1, 64, 16, 16)
    assert feats.nbytes == sum(t.numel() * 4 for t in (*feats.high_res, feats.low, feats.pos))
    both = FrameFeatures.cat([feats[0], feats[1:3]])
    assert len(both) == 3 and torch.equal(both.low, feats.low[:3])
    assert len(feats.to(torch.float64)[[3, 3]]) == 2


def test_encode_chunking_matches_single_batch(tiny, feats):
    with torch.no_grad():
        one = tiny.encode(tiny.preprocess(_frames(4)), chunk_size=4)
    assert torch.allclose(one.low, feats.low, atol=1e-5)
    assert torch.allclose(one.high_res[0], feats.high_res[0], atol=1e-5)


def test_decode_shapes_and_feature_reuse(tiny, feats):
    calls = []
    handle = tiny.sam2_model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        p = torch.randn(1, 64)
        with torch.no_grad():
            out = tiny.decode(feats, torch.tensor([2, 2, 0]), torch.cat([p, p, p]), mode="infer")
            single = tiny.decode(feats, [2], p, mode="infer")
    finally:
        handle.remove()
    assert calls == []  # decode never re-encodes
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[0], single[0], atol=1e-5)
    with pytest.raises(ValueError):
        tiny.decode(feats, [7], p)
    with pytest.raises(ValueError):
        tiny.decode(feats, [0], p, mode="eval")


def test_infer_vetoes_negative_object_score_train_does_not():
    g = _tiny()
    _force_object_score(g, -5.0)
    p = torch.randn(2, 64)
    with torch.no_grad():
        f = g.encode(g.preprocess(_frames(2)))
        infer = g.decode(f, [0, 1], p, mode="infer")
        train = g.decode(f, [0, 1], p, mode="train")
    assert torch.all(infer == NO_OBJ_SCORE)
    assert not torch.any(train == NO_OBJ_SCORE)
    _force_object_score(g, 5.0)
    with torch.no_grad():
        assert torch.allclose(g.decode(f, [0, 1], p, mode="infer"), train)


@pytest.mark.parametrize("freeze", [True, False])
def test_train_gradients_reach_decoder_not_image_encoder(freeze):
    g = _tiny().train()
    if freeze:
        g.freeze_for_training()
    f = g.encode(g.preprocess(_frames(2)))
    lang = torch.randn(2, 64, requires_grad=True)
    g.decode(f, [0, 1], lang, mode="train").sum().backward()
    dec = g.sam2_model.sam_mask_decoder
    assert dec.conv_s0.weight.grad is not None and dec.conv_s1.weight.grad is not None
    assert dec.transformer.layers[0].self_attn.q_proj.weight.grad is not None
    assert lang.grad is not None and lang.grad.abs().sum() > 0
    assert all(p.grad is None for p in g.sam2_model.image_encoder.parameters())
    assert all(p.grad is None for p in g.sam2_model.memory_encoder.parameters())


def test_decode_train_equals_per_frame_decode(tiny, feats):
    lang = torch.randn(4, 3, 64)
    with torch.no_grad():
        batched = tiny.decode_train(feats, lang)
        loop = torch.stack([torch.stack([tiny.decode(feats, [f], lang[f, k][None])[0] for k in range(3)])
                            for f in range(4)])
    assert batched.shape == (4, 3, 64, 64)
    assert torch.allclose(batched, loop, atol=1e-5)


def test_upsample_logits_two_steps(tiny):
    low = torch.randn(3, 64, 64)
    out = tiny.upsample_logits(low, (90, 120), chunk_size=2)
    step1 = torch.nn.functional.interpolate(low[:, None], size=(256, 256), mode="bilinear", align_corners=False)
    step2 = torch.nn.functional.interpolate(step1, size=(90, 120), mode="bilinear", align_corners=False)[:, 0]
    assert out.shape == (3, 90, 120) and torch.allclose(out, step2)


@pytest.mark.parametrize("fmt", [False, "uint8", "float32"])
def test_logits_to_outputs_staged_transfer_gives_the_same_bits(tiny, fmt):
    """The one-transfer path used on GPUs (staged) equals the per-chunk path bit for bit: NaN rows (Path B
    frames without a copy), an exact-zero logit (p = 0.5: mask off, uint8 128), one and several
    transfer groups, and an empty input."""
    from projects.sasasa2va.hf.models.inference import logits_to_outputs

    g = torch.Generator().manual_seed(3)
    low = torch.randn(5, tiny.low_res_size, tiny.low_res_size, generator=g) * 4
    low[1] = float("nan")
    low[2] = 0.0
    ref_m, ref_p = logits_to_outputs(tiny, low, (45, 70), fmt, chunk=2, staged=False)
    assert ref_m.dtype == bool and ref_m[0].any() and not ref_m[1].any() and not ref_m[2].any()
    for transfer_bytes in (64 << 20, 45 * 70 * 3, 45 * 70 * 9):  # one transfer / groups of one chunk / two
        m, p = logits_to_outputs(tiny, low, (45, 70), fmt, chunk=2, staged=True, transfer_bytes=transfer_bytes)
        assert m.dtype == bool and m.shape == (5, 45, 70) and np.array_equal(m, ref_m)
        if not fmt:
            assert p is None and ref_p is None
        else:
            assert p.dtype == ref_p.dtype == np.dtype(fmt) and np.array_equal(p, ref_p)
            assert not np.isnan(p).any() and (p[1] == 0).all()
    if fmt == "uint8":
        assert (ref_p[2] == 128).all()
    m, p = logits_to_outputs(tiny, low[:0], (45, 70), fmt, staged=True)
    assert m.shape == (0, 45, 70) and (p is None) == (not fmt)


def test_state_dict_g_weight_names_and_strict_reload(tmp_path, tiny):
    sd = tiny.state_dict()
    assert "sam2_model.memory_encoder.fuser.layers.0.g_weight" in sd
    assert not any(k.endswith(".gamma") for k in sd)
    path = tmp_path / "sam2.pt"
    torch.save({"model": sd}, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["model"]
    other = _tiny(seed=5)
    other.load_state_dict(loaded, strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in sd.items())
    gamma_sd = {k.replace(".g_weight", ".gamma"): v for k, v in loaded.items()}
    _tiny(seed=6).load_state_dict(gamma_sd, strict=True)
    official = official_sam2_state_dict(tiny.sam2_model)
    assert "memory_encoder.fuser.layers.1.gamma" in official
    third = _tiny(seed=7)
    third.sam2_model.load_state_dict(official, strict=True)
    assert torch.equal(third.sam2_model.memory_encoder.fuser.layers[1].gamma,
                       tiny.sam2_model.memory_encoder.fuser.layers[1].g_weight)


def test_propagate_path_c():
    g = _tiny(seed=3)
    _force_object_score(g, 5.0)  # keep masks alive so memories carry content
    with torch.no_grad():
        f = g.encode(g.preprocess(_frames(8, seed=4)))
    prompts = {0: torch.randn(64), 3: torch.randn(64), 5: torch.randn(64)}
    requested = []

    def features_fn(t):
        requested.append(t)
        return f[t]

    g.train()
    out = g.propagate(features_fn, 8, prompts)
    assert g.sam2_model.training  # eval only inside propagate
    assert out.shape == (8, 64, 64) and torch.isfinite(out).all()
    assert not torch.any(out == NO_OBJ_SCORE)
    with torch.no_grad():
        for t, p in prompts.items():
            assert torch.allclose(out[t], g.decode(f, [t], p[None], mode="infer")[0], atol=1e-5)
    assert sorted(requested) == list(range(8))  # every frame's features fetched exactly once
    same = propagate_with_memory(g.sam2_model, f, 8, prompts)
    assert torch.allclose(out, same, atol=1e-5)


def test_propagate_frames_before_first_condition_are_empty(tiny, feats):
    out = tiny.propagate(feats, 4, {2: torch.randn(64)})
    assert torch.all(out[:2] == NO_OBJ_SCORE) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        tiny.propagate(feats, 4, {})


def test_half_precision_sam2_needs_cuda():
    g = _tiny(seed=13).to(torch.bfloat16)
    with torch.no_grad():
        f = g.encode(g.preprocess(_frames(1)))
        assert f.high_res[0].dtype == torch.bfloat16  # (sam2 FPN top-down levels come out float32)
        with pytest.raises(ValueError, match="needs CUDA"):
            g.decode(f, [0], torch.randn(1, 64), mode="infer")


@pytest.mark.slow
def test_hiera_l_build_names_and_param_count():
    g = SAM2Grounding("sam2_hiera_l")
    sd = g.sam2_model.state_dict()
    assert any(k.startswith("image_encoder.trunk.blocks.47.") for k in sd)
    assert "memory_encoder.fuser.layers.0.g_weight" in sd
    assert "image_encoder.neck.convs.3.conv.weight" in sd and "sam_mask_decoder.conv_s0.weight" in sd
    n = sum(p.numel() for p in g.parameters())
    assert abs(n - 224_430_130) < 1_000_000, n  # official sam2_hiera_large: ~224.4M
    assert (g.hidden_dim, g.image_size, g.low_res_size) == (256, 1024, 256)


class _AppendLanguageToken:
    """Test helper: make SAM2's own prompt encoder append a language token, so SAM2Base's and
    SAM2VideoPredictor's code paths can serve as references for the glue in sam2_grounding."""

    def __init__(self, model):
        self.encoder, self.orig, self.lang = model.sam_prompt_encoder, model.sam_prompt_encoder.forward, None
        self.encoder.forward = self

    def __call__(self, points, boxes, masks):
        sparse, dense = self.orig(points, boxes, masks)
        if self.lang is not None:
            sparse = torch.cat([sparse, self.lang[:, None]], dim=1)
        return sparse, dense


def test_decode_infer_matches_sam2base_forward_sam_heads():
    from projects.sasasa2va.hf.models.sam2_grounding import decode_heads, object_pointer

    g = _tiny(seed=9)
    model = g.sam2_model
    with torch.no_grad():
        f = g.encode(g.preprocess(_frames(3)))
        lang = torch.randn(3, 64)
        mine = decode_heads(model, f, [0, 1, 2], lang, veto=True)
        hook = _AppendLanguageToken(model)
        hook.lang = lang
        ref = model._forward_sam_heads(backbone_features=f.low + model.no_mem_embed.view(1, -1, 1, 1),
                                       high_res_features=list(f.high_res), multimask_output=True)
    assert torch.allclose(mine["low_res_masks"], ref[3][:, 0], atol=1e-6)
    assert torch.allclose(object_pointer(model, mine), ref[5], atol=1e-6)


def _video_predictor(g, folder, seed: int):
    """SAM2VideoPredictor with ``g``'s weights (the reference for Path C), and a 6-frame JPEG video in folder."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from PIL import Image

    cfg = dict(g.sam2_config, _target_="sam2.sam2_video_predictor.SAM2VideoPredictor")
    predictor = instantiate(OmegaConf.create(cfg), _recursive_=True)
    predictor.load_state_dict(official_sam2_state_dict(g.sam2_model), strict=True)
    predictor.eval()
    for i, frame in enumerate(_frames(6, seed=seed)):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg")
    return predictor


def test_propagate_matches_sam2_video_predictor(tmp_path):
    """Path C == SAM2VideoPredictor (prompted frames added as initial conditioning frames, then
    propagate_in_video), with the language token injected through the prompt encoder."""
    g = _tiny(seed=11)
    _force_object_score(g, 5.0)
    predictor = _video_predictor(g, tmp_path, seed=12)
    prompts = {0: torch.randn(64), 2: torch.randn(64)}

    with torch.inference_mode():
        state = predictor.init_state(str(tmp_path))
        hook = _AppendLanguageToken(predictor)
        obj_idx = predictor._obj_id_to_idx(state, 1)
        for t, p in prompts.items():
            hook.lang = p[None]
            out, _ = predictor._run_single_frame_inference(
                state, state["output_dict_per_obj"][obj_idx], t, 1, True, None, None, False, False)
            state["temp_output_dict_per_obj"][obj_idx]["cond_frame_outputs"][t] = out
        hook.lang = None
        for _ in predictor.propagate_in_video(state):
            pass
        outputs = state["output_dict_per_obj"][obj_idx]
        ref = torch.stack([{**outputs["non_cond_frame_outputs"], **outputs["cond_frame_outputs"]}[t]["pred_masks"][0, 0]
                           for t in range(6)])
        images = state["images"].clone()
    with torch.no_grad():
        mine = g.propagate(g.encode(images), 6, prompts)
    assert torch.allclose(mine, ref, atol=1e-5), (mine - ref).abs().max()


def test_propagate_masks_matches_sam2_video_predictor_add_new_mask(tmp_path):
    """Sa2VA-i Path C == SAM2VideoPredictor with the original weights: masks of the conditioning frames
    (any resolution; here the fine-tuned model's, at a 100x120 "video" size) added with add_new_mask,
    then propagate_in_video -- every frame's low-res output, the conditioning ones included."""
    from projects.sasasa2va.hf.models.sam2_grounding import mask_input, propagate_masks_with_memory

    tuned, original = _tiny(seed=21), _tiny(seed=22)
    _force_object_score(tuned, 5.0)
    _force_object_score(original, 5.0)
    predictor = _video_predictor(original, tmp_path, seed=23)
    with torch.inference_mode():
        state = predictor.init_state(str(tmp_path))
        images = state["images"].clone()
    with torch.no_grad():
        low = tuned.decode(tuned.encode(images), [1, 3], torch.randn(2, 64), mode="infer")
        masks = dict(zip((1, 3), tuned.upsample_logits(low, (100, 120)) > 0))
        mine = propagate_masks_with_memory(original.sam2_model, original.encode(images), 6, masks)
    assert all(m.any() and not m.all() for m in masks.values())  # real masks, not empty/full
    assert mask_input(masks[1], 256).shape == (256, 256)
    with torch.inference_mode():
        for t, m in masks.items():
            predictor.add_new_mask(state, t, 1, m)
        for _ in predictor.propagate_in_video(state):
            pass
        outputs = state["output_dict_per_obj"][0]
        ref = {t: out["pred_masks"][0, 0] for t, out in {**outputs["non_cond_frame_outputs"],
                                                           **outputs["cond_frame_outputs"]}.items()}
    assert sorted(ref) == [1, 2, 3, 4, 5]
    for t, r in ref.items():
        assert torch.allclose(mine[t], r, atol=1e-5), (t, (mine[t] - r).abs().max())
    assert torch.all(mine[0] == NO_OBJ_SCORE)  # before the first conditioning frame: never visited
    with pytest.raises(ValueError, match="no conditioning frame"):
        propagate_masks_with_memory(original.sam2_model, original.encode(images[:1]), 1, {})


def test_with_original_weights_loads_an_official_checkpoint(tmp_path):
    tuned, original = _tiny(seed=31), _tiny(seed=32)
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": official_sam2_state_dict(original.sam2_model)}, path)
    twin = tuned.with_original_weights(str(path))
    assert twin is not tuned and not twin.training
    assert not any(p.requires_grad for p in twin.parameters())
    for (name, a), (_, b) in zip(twin.sam2_model.state_dict().items(), original.sam2_model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="not found"):
        tuned.with_original_weights(str(tmp_path / "missing.pt"))
    torch.save({"weights": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="under the key 'model'"):
        tuned.with_original_weights(str(tmp_path / "bad.pt"))
    sd = official_sam2_state_dict(original.sam2_model)
    sd.pop(next(iter(sd)))
    torch.save({"model": sd}, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="do not match"):
        tuned.with_original_weights(str(tmp_path / "short.pt"))
