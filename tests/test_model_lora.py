"""LoRA target lists per LLM architecture and merge equivalence."""
import pytest
import torch

from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import build_llm_config
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import build_language_model
from projects.sasasa2va.models import tiny
from projects.sasasa2va.models.lora import LORA_TARGETS, apply_lora, lora_target_names, lora_targets, merge_lora


class _Tok:
    """Just what tiny_llm_config reads from a tokenizer."""

    def __len__(self):
        return 64

    def convert_tokens_to_ids(self, token):
        return 0


def _small_llm(arch):
    cfg = tiny.tiny_llm_config(arch, _Tok())
    cfg.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3":
        cfg["head_dim"] = 8
    torch.manual_seed(0)
    return build_language_model(build_llm_config(cfg)).eval()


@pytest.mark.parametrize("arch", sorted(tiny.ARCHS))
def test_targets_found_and_merge_equivalence(arch):
    llm = _small_llm(arch)
    cls = type(llm)
    targets = lora_targets(tiny.ARCHS[arch])
    peft_model = apply_lora(llm, r=4, alpha=8, dropout=0.0)
    assert lora_target_names(peft_model) == set(targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero; make the adapters matter
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        after = merged(input_ids=ids).logits
    assert type(merged) is cls
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)


def test_target_lists():
    assert LORA_TARGETS["Qwen2ForCausalLM"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]
    assert LORA_TARGETS["Phi3ForCausalLM"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets("InternLM2ForCausalLM") == ["wqkv", "wo", "w1", "w2", "w3"]
    assert lora_targets("InternLM2ForCausalLM", include_internlm2_output=True)[-1] == "output"
    assert "output" not in lora_targets("Qwen2ForCausalLM", include_internlm2_output=True)


def test_internlm2_output_flag_and_bad_target():
    peft_model = apply_lora(_small_llm("internlm2"), r=2, alpha=4, include_internlm2_output=True)
    assert "output" in lora_target_names(peft_model)
    with pytest.raises(ValueError, match="not found"):
        apply_lora(_small_llm("qwen2"), r=2, targets=["wqkv"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(peft_model)
