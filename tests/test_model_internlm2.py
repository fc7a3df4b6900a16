"""InternLM2 re-implementation vs transformers' Llama with the same weights (proves the wqkv layout)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from projects.sasasa2va.hf.models.configuration_internlm2 import InternLM2Config
from projects.sasasa2va.hf.models.modeling_internlm2 import InternLM2ForCausalLM

HEADS, KV, HIDDEN = 8, 2, 64


def _configs(rope_scaling=None, max_pos=64):
    common = dict(vocab_size=97, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=max_pos, tie_word_embeddings=False, rope_scaling=rope_scaling)
    ilm = InternLM2Config(bias=False, pad_token_id=0, **common)
    llama = LlamaConfig(attention_bias=False, mlp_bias=False, pad_token_id=0, **common)
    llama._attn_implementation = "eager"
    return ilm, llama


def internlm2_to_llama(state, num_heads=HEADS, num_kv=KV):
    """Rename + split wqkv rows laid out as (kv_heads, groups + 2, head_dim)."""
    groups = num_heads // num_kv
    out = {}
    for key, value in state.items():
        k = key.replace("model.tok_embeddings", "model.embed_tokens").replace("output.weight", "lm_head.weight")
        k = (k.replace("attention.wo", "self_attn.o_proj").replace("feed_forward.w1", "mlp.gate_proj")
             .replace("feed_forward.w3", "mlp.up_proj").replace("feed_forward.w2", "mlp.down_proj")
             .replace("attention_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm"))
        if "attention.wqkv" in key:
            rows = value.view(num_kv, groups + 2, -1, value.shape[-1])
            base = k.replace("attention.wqkv.weight", "self_attn.")
            out[base + "q_proj.weight"] = rows[:, :groups].reshape(-1, value.shape[-1])
            out[base + "k_proj.weight"] = rows[:, -2].reshape(-1, value.shape[-1])
            out[base + "v_proj.weight"] = rows[:, -1].reshape(-1, value.shape[-1])
        else:
            out[k] = value
    return out


def _pair(rope_scaling=None, max_pos=64):
    torch.manual_seed(0)
    ilm_cfg, llama_cfg = _configs(rope_scaling, max_pos)
    ilm = InternLM2ForCausalLM(ilm_cfg).eval()
    llama = LlamaForCausalLM(llama_cfg).eval()
    missing, unexpected = llama.load_state_dict(internlm2_to_llama(ilm.state_dict()), strict=True)
    assert not missing and not unexpected
    return ilm, llama


def test_official_parameter_names():
    ilm, _ = _pair()
    keys = set(ilm.state_dict())
    for k in ["model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight", "model.layers.0.attention.wo.weight",
              "model.layers.1.feed_forward.w1.weight", "model.layers.1.feed_forward.w2.weight",
              "model.layers.1.feed_forward.w3.weight", "model.layers.0.attention_norm.weight",
              "model.layers.0.ffn_norm.weight", "model.norm.weight", "output.weight"]:
        assert k in keys
    assert ilm.state_dict()["model.layers.0.attention.wqkv.weight"].shape == ((HEADS + 2 * KV) * 8, HIDDEN)
    assert not any("bias" in k or "inv_freq" in k for k in keys)


@pytest.mark.parametrize("rope_scaling", [None, {"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 2.0}])
def test_logits_match_llama(rope_scaling):
    ilm, llama = _pair(rope_scaling, max_pos=16)
    ids = torch.randint(1, 97, (2, 24))  # longer than max_pos: exercises dynamic NTK
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    with torch.no_grad():
        a = ilm(ids, attention_mask=mask, output_hidden_states=True)
        b = llama(ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(a.logits[0], b.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.logits[1, 5:], b.logits[1, 5:], atol=1e-5, rtol=1e-5)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    torch.testing.assert_close(a.hidden_states[-1][0], b.hidden_states[-1][0], atol=1e-5, rtol=1e-5)


def test_kv_cache_and_generate():
    ilm, llama = _pair()
    ids = torch.randint(1, 97, (1, 10))
    with torch.no_grad():
        full = ilm(ids).logits
        first = ilm(ids[:, :6], use_cache=True)
        rest = ilm(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)
        embeds = ilm.get_input_embeddings()(ids)
        torch.testing.assert_close(ilm(inputs_embeds=embeds).logits, full)
        g1 = ilm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        g2 = llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_loss_and_resize():
    ilm, llama = _pair()
    ids = torch.randint(1, 97, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    torch.testing.assert_close(ilm(ids, labels=labels).loss, llama(ids, labels=labels).loss, atol=1e-5, rtol=1e-5)
    ilm.resize_token_embeddings(101)
    assert ilm.get_input_embeddings().weight.shape == (101, HIDDEN)
    assert ilm.get_output_embeddings().weight.shape == (101, HIDDEN)
    assert ilm.config.vocab_size == 101
    assert ilm.get_input_embeddings().weight.data_ptr() != ilm.get_output_embeddings().weight.data_ptr()


def test_bad_rope_scaling_rejected():
    with pytest.raises(ValueError, match="rope_scaling"):
        InternLM2Config(rope_scaling={"type": "yarn", "factor": 2.0})
