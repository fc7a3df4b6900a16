"""Chat model + builder on tiny official-layout checkpoints written in tmp folders."""
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from projects.sasasa2va.hf.models.configuration_sasasa2va_chat import SaSaSa2VAChatConfig
from projects.sasasa2va.hf.models.templates import IMG_CONTEXT_TOKEN, SPECIAL_TOKENS, image_token_string
from projects.sasasa2va.models import tiny
from projects.sasasa2va.models.builder import (
    add_special_tokens, hf_key_to_sa2va, load_internvl_folder, load_sa2va_pth, load_sam2_checkpoint,
    sa2va_key_to_hf,
)

SAM2 = {"name": "tiny"}
IMAGE = 56  # 4x4 patches -> 4 tokens per image after pixel shuffle (keeps tests fast)


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tiny_tokenizer(seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tiny")
    out = {arch: tiny.write_tiny_internvl(str(root / arch), arch, IMAGE, seed=0, tokenizer=tok) for arch in tiny.ARCHS}
    out["sam2"] = tiny.write_tiny_sam2(str(root / "sam2_tiny.pt"), seed=0)
    return out


def _load(folders, arch="qwen2", **kw):
    model, tokenizer = load_internvl_folder(folders[arch], SAM2, template="qwen_chat", **kw)
    return model.eval(), tokenizer


def _prompt(tokenizer, model, n_images, question="Please segment the red circle."):
    text = "<|user|>\n" + image_token_string(n_images, model.num_image_token) + "\n" + question + "<|end|>\n<|assistant|>\n"
    return torch.tensor([tokenizer(text).input_ids])


def test_tiny_internvl_folder_layout(folders, tok):
    with open(os.path.join(folders["qwen2"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "internvl_chat" and cfg["architectures"] == ["InternVLChatModel"]
    assert cfg["llm_config"]["vocab_size"] == len(tok) and cfg["llm_config"]["tie_word_embeddings"] is False
    reloaded = AutoTokenizer.from_pretrained(folders["qwen2"])
    base = len(reloaded) - 12
    ids = reloaded.convert_tokens_to_ids(tiny.QWEN_SPECIAL + tiny.INTERNVL_TOKENS)
    assert ids == list(range(base, base + 12))
    assert reloaded.eos_token == reloaded.pad_token == "<|endoftext|>" and reloaded.bos_token is None
    assert reloaded("<|user|>").input_ids != [reloaded.convert_tokens_to_ids("<|user|>")]  # plain text
    slow = AutoTokenizer.from_pretrained(folders["qwen2"], use_fast=False)
    text = "<|user|>\nPlease segment Clip_10 blue.<|end|>\n<img><IMG_CONTEXT></img>"
    assert slow(text).input_ids == reloaded(text).input_ids


@pytest.mark.parametrize("arch", sorted(tiny.ARCHS))
def test_load_internvl_folder_all_archs(folders, arch):
    model, tokenizer = _load(folders, arch)
    report = model.load_report
    assert not report.unexpected and not report.missing and not report.mismatched
    assert all(k.startswith(("grounding_encoder.", "text_hidden_fcs.")) for k in report.allowed_missing)
    assert model.config.llm_architecture == tiny.ARCHS[arch]
    assert model.img_context_token_id == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert model.num_image_token == 4
    pixel = torch.randn(2, 3, IMAGE, IMAGE)
    ids = _prompt(tokenizer, model, 2)
    with torch.no_grad():
        out = model(ids, pixel_values=pixel, labels=ids, output_hidden_states=True)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert out.hidden_states[-1].shape == (1, ids.shape[1], model.config.llm_config.hidden_size)


def test_unexpected_and_missing_keys_fail(folders, tmp_path, tok):
    from safetensors.torch import load_file, save_file
    path = tiny.write_tiny_internvl(str(tmp_path / "bad"), "qwen2", IMAGE, tokenizer=tok)
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd["vision_model.encoder.extra.weight"] = torch.zeros(1)
    save_file(sd, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match="vision_model.encoder.extra.weight"):
        load_internvl_folder(path, SAM2, "qwen_chat")
    del sd["vision_model.encoder.extra.weight"], sd["mlp1.3.bias"]
    save_file(sd, os.path.join(path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing: mlp1\.3\.bias"):
        load_internvl_folder(path, SAM2, "qwen_chat")


def test_sharded_safetensors(tmp_path, tok, folders):
    path = tiny.write_tiny_internvl(str(tmp_path / "sharded"), "qwen2", IMAGE, seed=0, max_shard_bytes=1_000_000,
                                    tokenizer=tok)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 2
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    sharded, _ = load_internvl_folder(path, SAM2, "qwen_chat")
    single, _ = _load(folders)
    a, b = sharded.state_dict(), single.state_dict()
    for key in a:
        if not key.startswith(("grounding_encoder", "text_hidden_fcs")):
            assert torch.equal(a[key], b[key]), key


def test_img_context_injection_and_mismatch(folders):
    model, tokenizer = _load(folders)
    ids = _prompt(tokenizer, model, 2)
    vision = torch.randn(2, model.num_image_token, model.config.llm_config.hidden_size)
    embeds = model.build_input_embeds(ids, vision_embeds=vision)
    slots = (ids[0] == model.img_context_token_id).nonzero().flatten()
    assert len(slots) == 8
    torch.testing.assert_close(embeds[0, slots], vision.reshape(8, -1))
    others = (ids[0] != model.img_context_token_id).nonzero().flatten()
    torch.testing.assert_close(embeds[0, others], model.get_input_embeddings()(ids)[0, others])
    with pytest.raises(ValueError, match=r"8 <IMG_CONTEXT> tokens \(id \d+\) but 4 vision tokens"):
        model.build_input_embeds(ids, vision_embeds=vision[:1])
    with pytest.raises(ValueError, match="no images"):
        model.build_input_embeds(ids)
    flags = torch.tensor([1, 0, 1])
    three = torch.cat([vision[:1], torch.zeros_like(vision[:1]), vision[1:]])
    torch.testing.assert_close(model.build_input_embeds(ids, vision_embeds=three, image_flags=flags), embeds)
    feats = model.extract_feature(torch.randn(3, 3, IMAGE, IMAGE))
    assert feats.shape == (3, 4, model.config.llm_config.hidden_size)


def test_add_special_tokens_and_resize(folders):
    model, tokenizer = _load(folders)
    old_len = len(tokenizer)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    seg = add_special_tokens(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(old_len, old_len + 5))
    assert seg == old_len == model.config.seg_token_id
    assert len(tokenizer) == old_len + 5 == model.config.llm_config.vocab_size
    assert model.get_input_embeddings().weight.shape[0] == old_len + 5
    assert model.language_model.get_output_embeddings().weight.shape[0] == old_len + 5
    torch.testing.assert_close(model.get_input_embeddings().weight[:old_len], old_rows)
    assert tokenizer("[SEG]", add_special_tokens=False).input_ids == [seg]
    assert add_special_tokens(model, tokenizer) == seg  # idempotent: nothing new, no resize
    assert model.get_input_embeddings().weight.shape[0] == old_len + 5


def test_seg_embeddings_only_at_seg_rows(folders):
    model, tokenizer = _load(folders)
    seg = add_special_tokens(model, tokenizer)
    ids = torch.tensor([[5, seg, 7, seg], [seg, 1, 2, 3]])
    hidden = torch.randn(2, 4, model.config.llm_config.hidden_size)
    out = model.seg_embeddings(hidden, ids)
    assert out.shape == (3, model.grounding_encoder.hidden_dim)
    torch.testing.assert_close(out, model.text_hidden_fcs(torch.stack([hidden[0, 1], hidden[0, 3], hidden[1, 0]])))


def test_sam2_checkpoint_strict(folders, tmp_path):
    model, _ = _load(folders)
    load_sam2_checkpoint(model, folders["sam2"])
    ckpt = torch.load(folders["sam2"], weights_only=True)["model"]
    gamma = [k for k in ckpt if k.endswith(".gamma")]
    assert gamma, "official layout names CXBlock layer scales '.gamma'"
    loaded = model.grounding_encoder.sam2_model.state_dict()
    torch.testing.assert_close(loaded[gamma[0][: -len("gamma")] + "g_weight"], ckpt[gamma[0]])
    ckpt["extra.weight"] = torch.zeros(1)
    torch.save({"model": ckpt}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="extra.weight"):
        load_sam2_checkpoint(model, str(tmp_path / "bad.pt"))
    torch.save(ckpt, tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="'model'"):
        load_sam2_checkpoint(model, str(tmp_path / "flat.pt"))


def test_key_mapping():
    assert sa2va_key_to_hf("mllm.model.language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert sa2va_key_to_hf("mllm.model.mlp1.0.weight") == "mlp1.0.weight"
    k = "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma"
    assert sa2va_key_to_hf(k) == k[:-5] + "g_weight" and hf_key_to_sa2va(sa2va_key_to_hf(k)) == k
    assert sa2va_key_to_hf("text_hidden_fcs.0.weight") == "text_hidden_fcs.0.weight"
    for key in ["vision_model.embeddings.class_embedding", "mlp1.3.bias", "language_model.lm_head.weight",
                "text_hidden_fcs.2.bias", "grounding_encoder.sam2_model.no_mem_embed"]:
        assert sa2va_key_to_hf(hf_key_to_sa2va(key)) == key


def test_sa2va_pth_round_trip_and_failures(folders, tmp_path):
    source, tokenizer = _load(folders)
    add_special_tokens(source, tokenizer)
    load_sam2_checkpoint(source, folders["sam2"])
    flat = {hf_key_to_sa2va(k): v.clone() for k, v in source.state_dict().items()}
    assert any(k.startswith("mllm.model.language_model.") for k in flat) and any(k.endswith(".gamma") for k in flat)
    torch.save({"state_dict": flat}, tmp_path / "sa2va.pth")

    target, tok2 = _load(folders)
    add_special_tokens(target, tok2)
    report = load_sa2va_pth(target, str(tmp_path / "sa2va.pth"))
    assert not report.missing and not report.unexpected and not report.mismatched
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    bad = dict(flat)
    bad["mllm.model.language_model.base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] = torch.zeros(2, 2)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected: language_model.base_model.model"):
        load_sa2va_pth(target, str(tmp_path / "bad.pth"))

    no_tokens, _ = _load(folders)  # embeddings not resized -> shape mismatch
    with pytest.raises(ValueError, match="shape mismatch: .*embed_tokens"):
        load_sa2va_pth(no_tokens, str(tmp_path / "sa2va.pth"))

    partial = {k: v for k, v in flat.items() if not k.startswith("text_hidden_fcs.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing: text_hidden_fcs"):
        load_sa2va_pth(target, str(tmp_path / "partial.pth"))
    assert load_sa2va_pth(target, str(tmp_path / "partial.pth"), allow_missing=["text_hidden_fcs.*"]).allowed_missing


class Scripted(torch.nn.Module):
    """Stand-in LM head that emits a fixed token sequence, one per call."""

    def __init__(self, tokens, vocab):
        super().__init__()
        self.tokens, self.vocab, self.calls = list(tokens), vocab, 0

    def forward(self, hidden):
        logits = torch.zeros(hidden.shape[0], self.vocab)
        logits[:, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1.0
        self.calls += 1
        return logits


def _scripted_model(folders, script_text, extra=()):
    model, tokenizer = _load(folders)
    seg = add_special_tokens(model, tokenizer)
    script = tokenizer(script_text, add_special_tokens=False).input_ids + list(extra)
    real_head = model.language_model.lm_head
    model.language_model.lm_head = Scripted(script, len(tokenizer))
    return model, tokenizer, seg, script, real_head


def test_generate_answer_stop_word_and_seg_states(folders):
    answer = "Sure, Clip_1 [SEG], Clip_2 [SEG].<|end|>\n"
    model, tokenizer, seg, script, _ = _scripted_model(folders, answer, extra=[5, 6, 7])
    ids = _prompt(tokenizer, model, 2)
    pixel = torch.randn(2, 3, IMAGE, IMAGE)
    out = model.generate_answer(ids, pixel_values=pixel, tokenizer=tokenizer, stop_words=["<|end|>"])
    expected = tokenizer(answer, add_special_tokens=False).input_ids
    assert out.ids.tolist() == expected  # stops on the token completing "<|end|>" (the \n is ignored)
    assert out.text == answer and out.prompt_cache is None
    assert out.seg_hidden_states.shape == (2, model.config.llm_config.hidden_size)
    # same states as a teacher-forced forward over prompt + answer (the [SEG] input positions)
    full = torch.cat([ids, out.ids[None]], 1)
    with torch.no_grad():
        hidden = model(full, pixel_values=pixel, output_hidden_states=True).hidden_states[-1][0]
    positions = [ids.shape[1] + i for i, t in enumerate(expected) if t == seg]
    torch.testing.assert_close(out.seg_hidden_states, hidden[positions], atol=1e-4, rtol=1e-4)


def test_generate_answer_eos_max_tokens_and_final_seg(folders):
    model, tokenizer, seg, script, _ = _scripted_model(folders, "It is")
    eos = tokenizer.eos_token_id
    model.language_model.lm_head.tokens = script + [seg, eos, 9]
    ids = _prompt(tokenizer, model, 1)
    vision = model.extract_feature(torch.randn(1, 3, IMAGE, IMAGE))
    out = model.generate_answer(ids, vision_embeds=vision, tokenizer=tokenizer, stop_words=["<|end|>"])
    assert out.ids.tolist() == script + [seg, eos] and out.seg_hidden_states.shape[0] == 1
    model.language_model.lm_head.calls = 0
    model.language_model.lm_head.tokens = script + [seg]
    out = model.generate_answer(ids, vision_embeds=vision, tokenizer=tokenizer, max_new_tokens=len(script) + 1)
    assert out.ids.tolist() == script + [seg]
    assert out.seg_hidden_states.shape[0] == 0  # a final [SEG] is never fed back


def test_generate_answer_prefix_cache_reuse(folders):
    model, tokenizer, seg, script, real_head = _scripted_model(folders, "Sure, [SEG].<|end|>")
    model.language_model.lm_head = real_head  # real greedy decoding
    vision = model.extract_feature(torch.randn(2, 3, IMAGE, IMAGE))
    ids_a = _prompt(tokenizer, model, 2, "Please segment the red circle.")
    ids_b = _prompt(tokenizer, model, 2, "Please segment the blue square moving left.")
    common = int((ids_a[0, : ids_b.shape[1]] == ids_b[0, : ids_a.shape[1]]).cumprod(0).sum())
    prefix = model.build_prefix_cache(ids_a[:, :common], vision_embeds=vision)
    assert prefix.num_image_tokens == 8 and prefix.cache.get_seq_length() == common
    for ids in (ids_a, ids_b):
        plain = model.generate_answer(ids, vision_embeds=vision, tokenizer=tokenizer, stop_words=["<|end|>"],
                                      max_new_tokens=6, return_prompt_cache=True)
        reused = model.generate_answer(ids, vision_embeds=vision, tokenizer=tokenizer, stop_words=["<|end|>"],
                                       max_new_tokens=6, prefix_cache=prefix)
        assert torch.equal(plain.ids, reused.ids)
        assert prefix.cache.get_seq_length() == common  # the shared prefix is not modified
        assert plain.prompt_cache.cache.get_seq_length() == ids.shape[1]
        assert plain.prompt_cache.num_image_tokens == 8
    with pytest.raises(ValueError, match="does not start with"):
        model.generate_answer(torch.cat([ids_b[:, :1] + 1, ids_b[:, 1:]], 1), vision_embeds=vision,
                              tokenizer=tokenizer, prefix_cache=prefix)


def test_config_round_trip(folders, tmp_path):
    model, _ = _load(folders, "internlm2")
    model.config.save_pretrained(tmp_path)
    back = SaSaSa2VAChatConfig.from_pretrained(tmp_path)
    assert back.llm_architecture == "InternLM2ForCausalLM"
    assert back.vision_config.qk_normalization is True and back.sam2_config == SAM2
    assert back.img_context_token_id == model.config.img_context_token_id
    assert back.num_clips == 10 and back.grid_size == 3 and back.num_sampled_frames == 100
    with pytest.raises(ValueError, match="internvl_chat"):
        SaSaSa2VAChatConfig.from_internvl_config({"model_type": "qwen2"})
    with open(os.path.join(folders["qwen2"], "config.json")) as f:
        raw = json.load(f)
    raw["llm_config"]["attn_implementation"] = "flash_attention_2"  # as in official configs
    cfg = SaSaSa2VAChatConfig.from_internvl_config(raw, sam2_config=SAM2, template="phi3_chat", num_clips=4)
    assert cfg.template == "phi3_chat" and cfg.num_clips == 4 and cfg.force_image_size == IMAGE
    assert cfg.llm_config._attn_implementation_internal is None


def test_make_tiny_pretrained_end_to_end(tmp_path):
    paths = tiny.make_tiny_pretrained(str(tmp_path / "t"), image_size=56)
    model, tokenizer = load_internvl_folder(paths["internvl"], SAM2, "phi3_chat")
    add_special_tokens(model, tokenizer)
    load_sam2_checkpoint(model, paths["sam2"])
    report = load_sa2va_pth(model, paths["sa2va_pth"])
    assert not report.missing and not report.unexpected


def test_lora_wrapped_language_model_and_training_step(folders):
    from projects.sasasa2va.models.lora import apply_lora, merge_lora

    model, tokenizer = _load(folders)
    add_special_tokens(model, tokenizer)
    model.language_model = apply_lora(model.language_model, r=4, alpha=8, dropout=0.0)
    model.train()
    model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = _prompt(tokenizer, model, 2)
    labels = ids.clone()
    labels[:, :-3] = -100
    pixel = torch.randn(2, 3, IMAGE, IMAGE)
    out = model(ids, pixel_values=pixel, labels=labels, output_hidden_states=True)
    out.loss.backward()
    assert model.mlp1[1].weight.grad is not None
    assert any(p.grad is not None for n, p in model.language_model.named_parameters() if "lora_B" in n)
    model.eval()
    with torch.no_grad():
        for n, p in model.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        before = model(ids, pixel_values=pixel).logits
        answer = model.generate_answer(ids, pixel_values=pixel, tokenizer=tokenizer, max_new_tokens=3)
        model.language_model = merge_lora(model.language_model)
        torch.testing.assert_close(model(ids, pixel_values=pixel).logits, before, atol=1e-4, rtol=1e-4)
    assert answer.ids.shape == (3,)
