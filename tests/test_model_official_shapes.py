"""Skeletons of the three real models on the meta device (no weights, no memory): parameter counts of the
InternVL part match checkpoints.md §3, and our SAM2 hiera-L is the sam2 package's own build."""
import os

import pytest
import torch

from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import SaSaSa2VAChatConfig
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import SaSaSa2VAChatModel

VIT_300M = dict(patch_size=14, image_size=448, qkv_bias=True, hidden_size=1024, num_attention_heads=16,
                intermediate_size=4096, qk_normalization=False, num_hidden_layers=24, norm_type="layer_norm",
                layer_norm_eps=1e-6)
VIT_6B = dict(patch_size=14, image_size=448, qkv_bias=False, hidden_size=3200, num_attention_heads=25,
              intermediate_size=12800, qk_normalization=True, num_hidden_layers=45, norm_type="rms_norm",
              layer_norm_eps=1e-6)
QWEN25_3B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151674, tie_word_embeddings=False)
QWEN3_14B = dict(architectures=["Qwen3ForCausalLM"], hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=False)
INTERNLM25_20B = dict(architectures=["InternLM2ForCausalLM"], hidden_size=6144, intermediate_size=16384,
                      num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8, vocab_size=92553,
                      bias=False, tie_word_embeddings=False)

# checkpoints.md §3 (computed totals of the InternVL chat models: ViT + mlp1 + LLM)
CASES = {
    "InternVL2_5-4B": (VIT_300M, QWEN25_3B, 3_712_637_952),
    "InternVL3_5-14B": (VIT_300M, QWEN3_14B, 15_119_523_840),
    "InternVL2_5-26B": (VIT_6B, INTERNLM25_20B, 25_514_186_112),
}


@pytest.fixture(autouse=True)
def cpu_linspace(monkeypatch):
    """sam2's Hiera calls torch.linspace(...)[i].item() for drop-path rates, which a meta tensor cannot do:
    keep that one helper on the CPU (parameters are still created on the meta device)."""
    orig = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: orig(*a, **{**k, "device": k.get("device") or "cpu"}))


def meta_model(vit, llm):
    config = SaSaSa2VAChatConfig(vision_config=dict(vit), llm_config=dict(llm), sam2_config={"name": "sam2_hiera_l"},
                                 template="phi3_chat", downsample_ratio=0.5, force_image_size=448, ps_version="v2")
    with torch.device("meta"):
        return SaSaSa2VAChatModel(config)


@pytest.mark.parametrize("name", sorted(CASES))
def test_internvl_parameter_counts_on_meta(name):
    vit, llm, expected = CASES[name]
    model = meta_model(vit, llm)
    assert all(p.device.type == "meta" for p in model.parameters())
    count = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith(("vision_model.", "mlp1.", "language_model.")))
    assert abs(count - expected) / expected < 0.01, (name, count, expected)
    # mlp1 = LN(4Cv) -> Linear(4Cv, D) -> GELU -> Linear(D, D)
    assert tuple(model.mlp1[1].weight.shape) == (llm["hidden_size"], 4 * vit["hidden_size"])
    assert tuple(model.text_hidden_fcs[2].weight.shape) == (256, llm["hidden_size"])


def test_sam2_hiera_l_matches_the_sam2_package_build():
    import sam2
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    model = meta_model(VIT_300M, dict(QWEN25_3B, num_hidden_layers=1))
    ours = {n: tuple(p.shape) for n, p in model.grounding_encoder.sam2_model.named_parameters()}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(sam2.__file__), "configs", "sam2"),
                               version_base="1.2"):
        cfg = compose(config_name="sam2_hiera_l")
    with torch.device("meta"):
        ref = instantiate(cfg.model, _recursive_=True)
    GlobalHydra.instance().clear()
    theirs = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    # the CXBlock layer scale is stored as `g_weight` (official HF exports) instead of `gamma`
    theirs = {n.replace(".gamma", ".g_weight"): s for n, s in theirs.items()}
    assert ours == theirs
    assert abs(sum(int(torch.Size(s).numel()) for s in ours.values()) - 224_430_130) < 1000
