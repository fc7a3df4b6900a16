"""InternViT names/shapes (checkpoints.md §2), position interpolation, pixel shuffle, mlp1."""
import torch

from projects.sasasa2va.hf.models.configuration_intern_vit import InternVisionConfig
from projects.sasasa2va.hf.models.modeling_intern_vit import InternVisionModel
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import build_mlp1, pixel_shuffle

C, I = 32, 64


def _vit(six_b: bool, **kw):
    cfg = InternVisionConfig(image_size=56, patch_size=14, hidden_size=C, intermediate_size=I, num_hidden_layers=2,
                             num_attention_heads=4, qkv_bias=not six_b, qk_normalization=six_b,
                             norm_type="rms_norm" if six_b else "layer_norm", **kw)
    torch.manual_seed(0)
    return InternVisionModel(cfg).eval()


def test_300m_style_keys_and_shapes():
    sd = _vit(False).state_dict()
    expected = {
        "embeddings.class_embedding": (1, 1, C),
        "embeddings.patch_embedding.weight": (C, 3, 14, 14),
        "embeddings.patch_embedding.bias": (C,),
        "embeddings.position_embedding": (1, 1 + 16, C),
    }
    for n in range(2):
        p = f"encoder.layers.{n}."
        expected.update({
            p + "attn.qkv.weight": (3 * C, C), p + "attn.qkv.bias": (3 * C,),
            p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
            p + "mlp.fc1.weight": (I, C), p + "mlp.fc1.bias": (I,),
            p + "mlp.fc2.weight": (C, I), p + "mlp.fc2.bias": (C,),
            p + "norm1.weight": (C,), p + "norm1.bias": (C,), p + "norm2.weight": (C,), p + "norm2.bias": (C,),
            p + "ls1": (C,), p + "ls2": (C,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_6b_style_keys():
    sd = _vit(True).state_dict()
    p = "encoder.layers.0."
    assert tuple(sd[p + "attn.q_norm.weight"].shape) == (C,) and tuple(sd[p + "attn.k_norm.weight"].shape) == (C,)
    assert p + "attn.qkv.bias" not in sd and p + "norm1.bias" not in sd and p + "norm2.bias" not in sd
    assert not any(k.startswith(("post_layernorm", "encoder.norm", "norm")) for k in sd)


def test_forward_shapes_and_interpolation():
    vit = _vit(True)
    x = torch.randn(2, 3, 56, 56)
    out = vit(pixel_values=x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 17, C)
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    bigger = vit(pixel_values=torch.randn(1, 3, 84, 84)).last_hidden_state  # 6x6 grid from a 4x4 table
    assert bigger.shape == (1, 37, C)
    # at the native size the interpolation path is the identity
    pos = vit.embeddings.position_embedding
    grid = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, 4, 4, C).permute(0, 3, 1, 2), size=(4, 4),
                                           mode="bicubic", align_corners=False)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), vit.embeddings._patch_positions(4, 4, torch.float32))


def test_drop_path_drops_whole_samples_and_rescales():
    from projects.sasasa2va.hf.models.modeling_intern_vit import drop_path

    x = torch.ones(256, 3, 4)
    torch.manual_seed(0)
    y = drop_path(x, 0.5, training=True)
    per_sample = y.reshape(256, -1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # each sample kept or dropped whole
    assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # kept ones scaled by 1 / keep_prob
    assert torch.equal(drop_path(x, 0.5, training=False), x) and torch.equal(drop_path(x, 0.0, training=True), x)
    vit = _vit(False, drop_path_rate=0.5)  # stochastic depth grows linearly over the layers, 0 at the first
    assert [layer.drop_path1.drop_prob for layer in vit.encoder.layers] == [0.0, 0.5]


def test_gradient_checkpointing_runs_each_layer_checkpointed_in_training_only(monkeypatch):
    x = torch.randn(2, 3, 56, 56)
    plain = _vit(False).train()
    plain(pixel_values=x).last_hidden_state.square().sum().backward()
    vit = _vit(False).train()
    vit.gradient_checkpointing_enable()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    vit(pixel_values=x).last_hidden_state.square().sum().backward()
    assert vit.encoder.gradient_checkpointing and calls == list(vit.encoder.layers)
    for (name, p), q in zip(vit.named_parameters(), plain.parameters()):  # same gradients as without it
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    calls.clear()
    with torch.no_grad():
        vit.eval()(pixel_values=x)
    assert calls == []


def test_pixel_shuffle_hand_example():
    # x[0, i, j, 0] = 10 * i + j on a 4x4 grid, one channel
    x = torch.tensor([[10.0 * i + j for j in range(4)] for i in range(4)]).reshape(1, 4, 4, 1)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 2, 2, 4)
    expected = torch.tensor([
        [[0, 1, 10, 11], [2, 3, 12, 13]],
        [[20, 21, 30, 31], [22, 23, 32, 33]],
    ], dtype=torch.float32).reshape(1, 2, 2, 4)
    assert torch.equal(out, expected)
    # v1 lacks the final transpose
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), expected.permute(0, 2, 1, 3))


def test_pixel_shuffle_general_formula():
    x = torch.randn(2, 6, 6, 3)
    out = pixel_shuffle(x, 0.5, "v2")
    for a in range(3):
        for b in range(3):
            want = torch.cat([x[:, 2 * a + di, 2 * b + dj] for di in range(2) for dj in range(2)], -1)
            torch.testing.assert_close(out[:, a, b], want)


def test_mlp1_layout():
    sd = build_mlp1(32, 48, 0.5).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "0.weight": (128,), "0.bias": (128,), "1.weight": (48, 128), "1.bias": (48,),
        "3.weight": (48, 48), "3.bias": (48,),
    }
