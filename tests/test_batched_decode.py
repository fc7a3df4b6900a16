"""Issue 6: batched greedy decoding (``generate_answers``) equals one-prompt decoding (``generate_answer``):
bit for bit with ``exact=True`` (the CPU default), same ids/text and [SEG] states up to rounding with
``exact=False``. VideoContext's batched prefetch leaves every result unchanged, and its SAM2 pair cache
equals fresh contexts with the same options bit for bit (CPU float32).

The tiny random model's LM head is wrapped by a row-wise remap (``RowScript``): each row's next token is
a fixed function of that row's own logits, drawn from a few text tokens, [SEG] and the stop word. So the
rows of a batch emit different answers of different lengths, with [SEG] tokens (hidden states to
compare) and early stops, while everything (prefill, decoding steps, [SEG] states) runs for real.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from projects.sasasa2va.evaluation import bench  # noqa: E402
from projects.sasasa2va.hf.models.frame_sampling import select_indices  # noqa: E402
from projects.sasasa2va.hf.models.inference import (  # noqa: E402
    InferenceOptions, build_prompt_text, canonical_boundary, token_id, tokenize_prompt,
)
from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import RaggedKVCache  # noqa: E402
from projects.sasasa2va.hf.models.templates import (  # noqa: E402
    IMG_END_TOKEN, SEG_TOKEN, eval_prompt, get_template, image_token_string,
)
from projects.sasasa2va.hf.models.video_context import VideoContext, lru_get, lru_put  # noqa: E402

TEXTS = ["the red car", "a dog running to the left quickly, then stopping near the tree", "person",
         "the thing that is on the far right of the picture and moves", "cat on a mat"]
MAX_NEW = 40


class RowScript:
    """Forward hook on the LM head: row r's logits become one-hot on CHOICES[argmax(row r) % len]."""

    def __init__(self, model, tok):
        stop = get_template(model.config.template)["STOP_WORDS"][0]
        words = [tok(w, add_special_tokens=False).input_ids[0] for w in (" Sure", " the", ",", " Clip")]
        seg = tok(SEG_TOKEN, add_special_tokens=False).input_ids[0]
        end = tok(stop, add_special_tokens=False).input_ids[0]
        self.choices = torch.tensor(words + [seg, seg, seg, end])
        self.seg, self.end = seg, end
        self.handle = model.language_model.get_output_embeddings().register_forward_hook(self.hook)

    def hook(self, module, args, out):
        pick = self.choices.to(out.device)[out.float().argmax(-1) % len(self.choices)]
        new = torch.zeros_like(out)
        new.scatter_(-1, pick.unsqueeze(-1), 1.0)
        return new

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = bench.build_tiny_model(str(tmp_path_factory.mktemp("batched_tiny")))
    yield model, tok
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scripted(tiny):
    model, tok = tiny
    script = RowScript(model, tok)
    yield model, tok, script
    script.remove()


def prompt_ids(model, tok, text, n_images=20):
    prompt = build_prompt_text(eval_prompt(text), image_token_string(n_images, model.num_image_token),
                               model.config.template)
    return tokenize_prompt(tok, prompt, "cpu")


def vision(model, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, model.num_image_token, model.config.llm_config.hidden_size, generator=g) * 0.5


def prefix_for(model, tok, ids, seed):
    boundary = canonical_boundary(ids, token_id(tok, IMG_END_TOKEN))
    assert 0 < boundary < ids.shape[1]
    return model.build_prefix_cache(ids[:, :boundary], vision_embeds=vision(model, seed))


def singles(model, tok, ids_list, prefixes, max_new=MAX_NEW):
    stop = get_template(model.config.template)["STOP_WORDS"]
    return [model.generate_answer(ids, prefix_cache=p, tokenizer=tok, stop_words=stop, max_new_tokens=max_new)
            for ids, p in zip(ids_list, prefixes)]


def batched(model, tok, ids_list, prefix, exact, max_new=MAX_NEW):
    stop = get_template(model.config.template)["STOP_WORDS"]
    return model.generate_answers(ids_list, prefix_cache=prefix, tokenizer=tok, stop_words=stop,
                                  max_new_tokens=max_new, exact=exact)


def check_interesting(answers, script):
    """Rows differ in length, one stops early on the stop word, some carry [SEG] states."""
    lengths = [len(a.ids) for a in answers]
    assert len(set(lengths)) > 1, lengths
    assert any(n < MAX_NEW and int(a.ids[-1]) == script.end for n, a in zip(lengths, answers)), lengths
    assert any(a.seg_hidden_states.shape[0] > 0 for a in answers)
    for a in answers:  # the final token is never fed back: a trailing [SEG] has no state
        fed = a.ids[:-1].tolist()
        assert a.seg_hidden_states.shape[0] == fed.count(script.seg)


# ================================================================================================ model level
@pytest.fixture(params=["interface", "mode"])
def exact_path(request, scripted, monkeypatch):
    """Exact passes through the light path (patched linears + SDPA attention interface, HF LLMs) or the
    generic RowExact torch-function mode (LLMs calling SDPA themselves, e.g. InternLM2)."""
    model, _, _ = scripted
    if request.param == "mode":
        monkeypatch.setattr(type(model), "_uses_row_attention", lambda self: False)
    else:
        assert model._uses_row_attention()
    return request.param


def test_exact_batch_equals_one_at_a_time_bitwise(scripted, exact_path):
    model, tok, script = scripted
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS]
    assert len({x.shape[1] for x in ids_list}) > 1  # suffixes of different lengths
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    ref = singles(model, tok, ids_list, [prefix] * len(ids_list))
    check_interesting(ref, script)
    got = batched(model, tok, ids_list, prefix, exact=True)
    assert model.config.llm_config._attn_implementation == "sdpa"  # the exact passes restored the model
    assert not any("forward" in vars(m) for m in model.language_model.modules())
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert torch.equal(a.ids, b.ids) and a.text == b.text
        assert a.seg_hidden_states.shape == b.seg_hidden_states.shape
        assert torch.equal(a.seg_hidden_states, b.seg_hidden_states)  # bit for bit
        assert b.prompt_cache is None


def test_max_seg_tokens_stops_after_that_many_seg_states_and_keeps_them(scripted):
    model, tok, script = scripted
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS]
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    stop = get_template(model.config.template)["STOP_WORDS"]
    full = singles(model, tok, ids_list, [prefix] * len(ids_list), max_new=200)
    counts = [a.seg_hidden_states.shape[0] for a in full]
    assert max(counts) > 2, counts  # some answers carry more than 2 [SEG] states
    capped = [model.generate_answer(ids, prefix_cache=prefix, tokenizer=tok, stop_words=stop, max_new_tokens=200,
                                    max_seg_tokens=2) for ids in ids_list]
    together = model.generate_answers(ids_list, prefix_cache=prefix, tokenizer=tok, stop_words=stop,
                                      max_new_tokens=200, exact=True, max_seg_tokens=2)
    for a, c, b in zip(full, capped, together):
        n = min(2, a.seg_hidden_states.shape[0])
        assert torch.equal(c.seg_hidden_states, a.seg_hidden_states[:n])  # the first states, unchanged
        assert torch.equal(b.ids, c.ids) and torch.equal(b.seg_hidden_states, c.seg_hidden_states)
        assert torch.equal(c.ids, a.ids[:len(c.ids)])  # a prefix of the uncapped answer ...
        if a.seg_hidden_states.shape[0] > 2:  # ... ending one token after the 2nd [SEG] was fed back
            assert len(c.ids) < len(a.ids) and c.ids[:-1].tolist().count(script.seg) == 2
            assert int(c.ids[-2]) == script.seg


def test_fast_batch_matches_up_to_rounding(scripted, capsys):
    model, tok, script = scripted
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS]
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    ref = singles(model, tok, ids_list, [prefix] * len(ids_list))
    got = batched(model, tok, ids_list, prefix, exact=False)
    bitwise = True
    worst = 0.0
    for a, b in zip(ref, got):
        assert torch.equal(a.ids, b.ids) and a.text == b.text
        torch.testing.assert_close(b.seg_hidden_states, a.seg_hidden_states, rtol=1e-4, atol=1e-4)
        bitwise &= torch.equal(a.seg_hidden_states, b.seg_hidden_states)
        if a.seg_hidden_states.numel():
            worst = max(worst, float((a.seg_hidden_states - b.seg_hidden_states).abs().max()))
    with capsys.disabled():
        print(f"\n[exact=False] seg hidden states bitwise equal: {bitwise}; max abs difference {worst:.3g}")


def test_gqa_decode_attention_equals_sdpa_with_repeated_kv():
    """One-token steps: the GQA-folded matmul attention computes transformers' SDPA attention (keys and
    values expanded to every query head) over a ragged padding mask; longer passes go to SDPA itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from projects.sasasa2va.hf.models.modeling_sasasa2va_chat import _gqa_decode_attention, ragged_attention_mask

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    lengths = [4, 9, 6]
    key = torch.randn(3, 2, 10, 8, generator=g)
    value = torch.randn(3, 2, 10, 8, generator=g)
    query = torch.randn(3, 6, 1, 8, generator=g)
    mask = ragged_attention_mask(lengths, 1, torch.float32, "cpu")
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, _ = _gqa_decode_attention(module, query, key, value, mask, scaling=0.3)
    assert got.shape == ref.shape == (3, 1, 6, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # keys past a row's length do not matter
    noisy = key.clone()
    noisy[0, :, lengths[0] + 1:] = 1e3
    torch.testing.assert_close(_gqa_decode_attention(module, query, noisy, value, mask, scaling=0.3)[0], got)
    wide = ragged_attention_mask(lengths, 2, torch.float32, "cpu")
    q2 = torch.randn(3, 6, 2, 8, generator=g)
    k2, v2 = torch.randn(3, 2, 11, 8, generator=g), torch.randn(3, 2, 11, 8, generator=g)
    assert torch.equal(_gqa_decode_attention(module, q2, k2, v2, wide)[0],
                       sdpa_attention_forward(module, q2, k2, v2, wide)[0])


def test_fast_batch_with_matmul_decode_attention(scripted, monkeypatch):
    """generate_answers(exact=False) with decode_attention="matmul" (the default): every one-token step
    attends through _gqa_decode_attention; same answers as SDPA steps (decode_attention="sdpa"), [SEG]
    states up to rounding; the model's attention setting restored; a bad value is refused."""
    from projects.sasasa2va.hf.models import modeling_sasasa2va_chat as mc

    model, tok, script = scripted
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS]
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    calls = []
    original = mc._gqa_decode_attention

    def spy(module, query, *args, **kwargs):
        calls.append(int(query.shape[2]))
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(mc, "_gqa_decode_attention", spy)
    stop = get_template(model.config.template)["STOP_WORDS"]
    ref = model.generate_answers(ids_list, prefix_cache=prefix, tokenizer=tok, stop_words=stop,
                                 max_new_tokens=MAX_NEW, exact=False, decode_attention="sdpa")
    assert calls == []
    got = batched(model, tok, ids_list, prefix, exact=False)  # the default
    assert calls and set(calls) == {1}
    assert model.config.llm_config._attn_implementation == "sdpa"
    for a, b in zip(ref, got):
        assert torch.equal(a.ids, b.ids) and a.text == b.text
        torch.testing.assert_close(b.seg_hidden_states, a.seg_hidden_states, rtol=1e-4, atol=1e-4)
    calls.clear()  # VideoContext passes its decode_attention to the batched decoding
    ctx = model.video_context(tok, _frames(12), exact_rows=False, decode_attention="sdpa")
    assert ctx.prefetch_generations([(eval_prompt(t), "uniform", None) for t in TEXTS[:3]]) == 3
    assert calls == []
    ctx = model.video_context(tok, _frames(12), exact_rows=False)
    assert ctx.prefetch_generations([(eval_prompt(t), "uniform", None) for t in TEXTS[:3]]) == 3
    assert calls and set(calls) == {1}
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        model.generate_answers(ids_list, prefix_cache=prefix, tokenizer=tok, decode_attention="flash")
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        model.video_context(tok, _frames(3), decode_attention="flash")


def test_one_prefix_per_prompt_and_no_prefix(scripted, exact_path):
    """Prompts with different images (one prefix each, as q_frame) share a batch, equal question lengths
    prefilled together; text-only prompts (no prefix) too."""
    model, tok, _ = scripted
    ids_list = [prompt_ids(model, tok, t) for t in (TEXTS[0], TEXTS[0], TEXTS[2], TEXTS[2], TEXTS[1])]
    prefixes = [prefix_for(model, tok, ids, seed=i) for i, ids in enumerate(ids_list)]
    ref = singles(model, tok, ids_list, prefixes)
    for exact in (True, False):
        got = batched(model, tok, ids_list, prefixes, exact=exact)
        for a, b in zip(ref, got):
            assert torch.equal(a.ids, b.ids) and a.text == b.text
            if exact:
                assert torch.equal(a.seg_hidden_states, b.seg_hidden_states)
            else:
                torch.testing.assert_close(b.seg_hidden_states, a.seg_hidden_states, rtol=1e-4, atol=1e-4)
    text_only = [tokenize_prompt(tok, build_prompt_text(t, None, model.config.template), "cpu")
                 for t in (TEXTS[0], TEXTS[0], TEXTS[2])]
    ref = singles(model, tok, text_only, [None] * 3)
    got = batched(model, tok, text_only, None, exact=True)
    for a, b in zip(ref, got):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.seg_hidden_states, b.seg_hidden_states)


def test_batch_of_one_is_generate_answer(scripted, monkeypatch):
    model, tok, _ = scripted
    ids = prompt_ids(model, tok, TEXTS[1])
    prefix = prefix_for(model, tok, ids, seed=3)
    ref = singles(model, tok, [ids], [prefix])[0]
    calls = []
    original = model.generate_answer

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate_answer", spy)
    (got,) = batched(model, tok, [ids[0]], [prefix], exact=True)  # a 1-D prompt is accepted too
    assert calls == [1]
    assert torch.equal(ref.ids, got.ids) and ref.text == got.text
    assert torch.equal(ref.seg_hidden_states, got.seg_hidden_states)
    assert batched(model, tok, [], prefix, exact=True) == []


def test_batched_decode_errors(scripted):
    model, tok, _ = scripted
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS[:2]]
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate_answers(ids_list, prefix_cache=prefix)
    with pytest.raises(ValueError, match="prefix caches for"):
        batched(model, tok, ids_list, [prefix], exact=True)
    other = ids_list[1].clone()
    other[0, 2] += 1  # a token inside the prefix differs
    with pytest.raises(ValueError, match="prefix-cache tokens"):
        batched(model, tok, [ids_list[0], other], prefix, exact=True)
    short = prefix_for(model, tok, ids_list[0], seed=0)
    short.input_ids = short.input_ids[:, :5]  # a prefix ending before the images
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        batched(model, tok, ids_list, short, exact=False)


def test_forced_answer_drives_batches(tiny):
    """bench.ForcedAnswer (benchmark-only) wraps generate_answers too: every row answers the text."""
    model, tok = tiny
    ids_list = [prompt_ids(model, tok, t) for t in TEXTS[:3]]
    prefix = prefix_for(model, tok, ids_list[0], seed=0)
    with bench.ForcedAnswer(model, tok) as fa:
        ref = singles(model, tok, ids_list, [prefix] * 3, max_new=200)
        got = batched(model, tok, ids_list, prefix, exact=True, max_new=200)
        assert "generate_answers" in model.__dict__
    assert "generate_answers" not in model.__dict__
    for a, b in zip(ref, got):
        assert a.ids.tolist() == fa.ids and b.ids.tolist() == fa.ids
        assert b.seg_hidden_states.shape[0] == fa.num_seg
        assert torch.equal(a.seg_hidden_states, b.seg_hidden_states)


def test_ragged_cache_rows_stay_contiguous():
    lengths = [3, 1, 0]
    rows = [None if n == 0 else torch.arange(2 * n * 4, dtype=torch.float32).reshape(1, 2, n, 4) + 100 * b
            for b, n in enumerate(lengths)]

    class Legacy:  # the to_legacy_cache() view of a one-layer DynamicCache
        def __init__(self, k):
            self.k = k

        def to_legacy_cache(self):
            return ((self.k, -self.k),)

    cache = RaggedKVCache.from_caches([None if r is None else Legacy(r) for r in rows], reserve=1)
    assert cache.lengths == lengths and cache.get_seq_length() == 3
    new = torch.full((3, 2, 2, 4), 7.0)
    k, v = cache.update(new, -new, 0)  # 2 tokens per row: capacity grows
    assert k.shape == (3, 2, 5, 4) and torch.equal(v, -k)
    for b, n in enumerate(lengths):
        if n:
            assert torch.equal(k[b, :, :n], rows[b][0])
        assert torch.equal(k[b, :, n:n + 2], new[b])
    cache.advance(2)
    assert cache.lengths == [5, 3, 2]
    cache.select([2, 0])
    assert cache.lengths == [2, 5] and cache.key_cache[0].shape[0] == 2
    assert torch.equal(cache.key_cache[0][1, :, :3], rows[0][0])


# ================================================================================================ VideoContext
def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(n)]


def _qlist(n, seed):
    rng = np.random.default_rng(seed)
    return sorted(list(range(n)) + rng.choice(n, 100 - n).tolist())


def _same(a, b):
    return (a["prediction"] == b["prediction"] and a["num_seg"] == b["num_seg"]
            and np.array_equal(a["prediction_masks"][0], b["prediction_masks"][0])
            and np.array_equal(a["probabilities"][0], b["probabilities"][0]))


def test_video_prefetch_batches_and_changes_nothing(tiny, monkeypatch):
    """predict_video decodes all answers of a video in batches (fewer, larger generate_answers calls),
    with results and work counters bit-identical to decoding one prompt at a time."""
    model, tok = tiny
    frames = _frames(14)  # (up to 11 frames, wrap_around samples what uniform samples)
    texts = [eval_prompt(t) for t in TEXTS[:3]]
    fids = {i: _qlist(14, 30 + i) for i in range(3)}
    modes = ["uniform", "uniform_plus", "q_frame", "wrap_around"]
    sizes = []
    original = type(model).generate_answers

    def spy(self, input_ids_list, *args, **kwargs):
        sizes.append(len(input_ids_list))
        return original(self, input_ids_list, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate_answers", spy)
    with bench.ForcedAnswer(model, tok, "Sure, " + " ".join([SEG_TOKEN] * 10) + "."):
        one = model.video_context(tok, frames, decode_batch_prompts=1)
        ref = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=one)
        assert sizes == []
        ctx = model.video_context(tok, frames, decode_batch_prompts=4)
        got = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=ctx)
        # a KV budget below one row's caches: every answer decoded alone again
        alone = model.video_context(tok, frames, decode_batch_kv_bytes=1)
        again = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=alone)
    # 3 texts: uniform(=uniform_plus) x3 + q_frame x3 + wrap_around x3 = 9 distinct answers, batches of <= 4
    assert sizes == [3, 3, 3]
    for m in modes:
        for a, b, c in zip(ref[m], got[m], again[m]):
            assert _same(a, b) and _same(a, c), m
    assert one.counters == ctx.counters == alone.counters
    assert ctx.counters.generations_reused == 3  # uniform_plus reuses uniform's answer, as one at a time


def test_naive_path_equals_shared_path_bitwise(tiny):
    """CPU: the naive path (everything recomputed per (text, mode), the benchmark's baseline) runs the
    shared path's batch-invariant units, so even the float probabilities -- not only thresholded masks
    -- are bit for bit the shared path's, in all five modes; the naive path still does all its work."""
    from projects.sasasa2va.hf.models.frame_sampling import MODES

    model, tok = tiny
    frames = _frames(13, seed=7)
    texts = [eval_prompt(t) for t in TEXTS[:2]]
    fids = {i: _qlist(13, 50 + i) for i in range(len(texts))}
    with bench.ForcedAnswer(model, tok, "Sure, " + " ".join([SEG_TOKEN] * 10) + "."):
        ctx = model.video_context(tok, frames)
        got = model.predict_video(frames, texts, tok, list(MODES), selected_fids=fids, context=ctx)
        works = []
        for i, text in enumerate(texts):
            for m in MODES:
                naive = VideoContext(model, tok, frames, naive=True)
                ref = naive.predict(text, m, selected_fids=fids[i] if m == "q_frame" else None, return_probs=True)
                assert _same(got[m][i], ref), (m, i)
                works.append(naive.counters)
    # no reuse inside a naive prediction: every frame encoded, all 20 images through the ViT
    assert all(w.sam2_frames_encoded == 13 and w.mllm_images_encoded == 20 for w in works)
    assert ctx.counters.sam2_frames_encoded == 13
    assert ctx.counters.sam2_decodes < sum(w.sam2_decodes for w in works)


def test_decode_batch_limit_follows_the_kv_budget(tiny):
    """Prompts per decode batch: decode_batch_prompts, lowered to what the KV budget holds: every row its
    prompt + min(max_new_tokens, 256) tokens, every distinct prefix once, keys and values of every layer."""
    from projects.sasasa2va.hf.models.video_context import CPU_DECODE_BATCH_KV_BYTES, kv_bytes_per_token
    from projects.sasasa2va.models.tiny import TINY_LLM

    model, tok = tiny
    per_token = kv_bytes_per_token(model.config.llm_config, torch.float32)
    head_dim = TINY_LLM["hidden_size"] // TINY_LLM["num_attention_heads"]
    assert per_token == 2 * TINY_LLM["num_hidden_layers"] * TINY_LLM["num_key_value_heads"] * head_dim * 4
    assert kv_bytes_per_token(model.config.llm_config, torch.bfloat16) == per_token // 2

    def item(n, boundary, keys):
        ids = torch.zeros((1, n), dtype=torch.long)
        return (tuple(ids[0].tolist()), keys, 40, 10), ids, None, boundary

    # two prompts of one mode share a 250-token prefix; a q_frame-like prompt has its own
    todo = [item(300, 250, ("u",)), item(310, 250, ("u",)), item(340, 260, ("q",))]
    total = (300 + 40) + (310 + 40) + (340 + 40) + 250 + 260  # rows (max_new_tokens=40) + distinct prefixes
    frames = _frames(3)
    ctx = model.video_context(tok, frames)
    assert ctx.decode_batch_prompts == 64 and ctx.decode_batch_kv_bytes == CPU_DECODE_BATCH_KV_BYTES
    assert ctx.decode_batch_limit(todo, 40) == 64  # the tiny LLM's rows are small
    for budget, want in ((total * per_token, 3), (total * per_token - 1, 2), (total * per_token // 3, 1),
                         (1, 1), (1000 * total * per_token, 7), (0, 7)):
        ctx = model.video_context(tok, frames, decode_batch_prompts=7, decode_batch_kv_bytes=budget)
        assert ctx.decode_batch_limit(todo, 40) == want, budget
    ctx = model.video_context(tok, frames, decode_batch_kv_bytes=total * per_token)
    assert ctx.decode_batch_limit(todo, 1000) == 3 * total // (total + 3 * (256 - 40))  # room capped at 256
    for bad in (-5, 1.5, "4GB"):
        with pytest.raises(ValueError, match="decode_batch_kv_bytes"):
            model.video_context(tok, frames, decode_batch_kv_bytes=bad)


def test_default_decode_batch_kv_bytes(monkeypatch):
    """GPU: half of (total memory - the model's weights and buffers), at least 1 GiB; CPU: 4 GiB."""
    from types import SimpleNamespace

    from projects.sasasa2va.hf.models import video_context as vc

    model = torch.nn.Linear(1024, 1024)  # 1024 * 1024 + 1024 float32 = 4 MiB + 4 KiB
    model.register_buffer("extra", torch.zeros(256, dtype=torch.bfloat16))  # 512 bytes
    weights = (1024 * 1024 + 1024) * 4 + 512
    assert vc.default_decode_batch_kv_bytes(model, torch.device("cpu")) == 4 << 30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 << 30))
    assert vc.default_decode_batch_kv_bytes(model, torch.device("cuda:0")) == ((80 << 30) - weights) // 2
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=weights + 5))
    assert vc.default_decode_batch_kv_bytes(model, torch.device("cuda:0")) == 1 << 30


def test_video_pair_cache_is_exact_and_dedupes(tiny):
    from projects.sasasa2va.hf.models import video_context as vc

    """With the pair cache (on by default; RowExact SAM2 decodes on CPU), predict_video equals fresh
    per-(text, mode) contexts and contexts without the cache bit for bit, and decodes each (frame, [SEG])
    pair of an answer once."""
    model, tok = tiny
    frames = _frames(11, seed=4)
    texts = [eval_prompt(t) for t in TEXTS[:2]]
    modes = ["uniform", "uniform_plus"]  # same answer; Path A then Path B
    with bench.ForcedAnswer(model, tok, "Sure, " + " ".join([SEG_TOKEN] * 10) + "."):
        ctx = model.video_context(tok, frames)
        got = model.predict_video(frames, texts, tok, modes, context=ctx)
        plain = model.video_context(tok, frames, pair_cache_bytes=0)
        without = model.predict_video(frames, texts, tok, modes, context=plain)
        for i, text in enumerate(texts):
            for m in modes:
                fresh = VideoContext(model, tok, frames).predict(text, m, return_probs=True)
                assert _same(got[m][i], fresh) and _same(got[m][i], without[m][i]), (m, i)
    assert ctx.pair_cache_bytes == vc.PAIR_CACHE_BYTES
    plans = [ctx.plan_for(m, select_indices(11, m, 100), InferenceOptions()) for m in modes]
    pairs = [set(zip(p.decode_frames, p.prompt_index)) for p in plans]
    assert plain.counters.sam2_decodes == len(texts) * sum(len(p) for p in pairs)
    assert ctx.counters.sam2_decodes == len(texts) * len(pairs[0] | pairs[1]) < plain.counters.sam2_decodes


def test_build_images_dedupes_and_matches_building_in_order(tiny, monkeypatch):
    """A prompt's missing KFC images: each distinct key built once, in worker threads when there are
    several (same pixels as building them one after the other), lazily opened frames decoded first."""
    import threading

    from PIL import Image

    from projects.sasasa2va.hf.models import video_context as vc
    from projects.sasasa2va.hf.models.preprocessing import kfc_mllm_images

    model, tok = tiny
    frames = [Image.fromarray(f) for f in _frames(12, seed=9)]
    ctx = model.video_context(tok, frames)
    specs = ctx.clip_image_specs(select_indices(12, "uniform", 100))
    specs = specs + specs[:6]  # keys repeated (as a short video's clips can be)
    threads, calls = set(), []

    def spy(key, build):
        def run():
            threads.add(threading.current_thread().name)
            calls.append(key)
            return build()
        return key, run

    monkeypatch.setattr(vc, "IMAGE_WORKERS", 4)
    built = ctx.build_images([spy(k, b) for k, b in specs])
    keys = [k for k, _ in specs]
    assert sorted(calls, key=repr) == sorted(set(keys), key=repr) and len(set(keys)) < len(keys)
    assert all(name.startswith("kfc-images") for name in threads) and ctx._frames_loaded
    ref = kfc_mllm_images(frames, select_indices(12, "uniform", 100), 10, model.config.grid_size,
                          model.config.image_size)
    assert torch.equal(torch.stack([built[k] for k in keys[:20]]), ref)
    monkeypatch.setattr(vc, "IMAGE_WORKERS", 1)
    threads.clear()
    one = model.video_context(tok, frames).build_images([spy(k, b) for k, b in specs])
    assert threads == {threading.current_thread().name}  # one worker: built in the calling thread
    assert all(torch.equal(one[k], built[k]) for k in built)


def test_sam2_frames_resized_ahead_in_the_workers(tiny, monkeypatch):
    """SAM2's frame resizes run in the image workers: a block is started ahead (prefetch_generations starts
    the first before decoding the answers; encoding a block starts the next) and each frame is resized once; the features equal
    resizing every frame in order in the calling thread, bit for bit."""
    from projects.sasasa2va.hf.models import video_context as vc

    model, tok = tiny
    frames = _frames(11)
    monkeypatch.setattr(vc, "IMAGE_WORKERS", 1)
    ref = model.video_context(tok, frames, encode_batch=4).gather_features(range(11))
    calls, real = [], vc.sam2_resize

    def spy(frame, size):
        calls.append(threading.current_thread().name)
        return real(frame, size)

    monkeypatch.setattr(vc, "sam2_resize", spy)
    monkeypatch.setattr(vc, "IMAGE_WORKERS", 3)
    ctx = model.video_context(tok, frames, encode_batch=4)
    assert ctx.schedule_sam2_block(1) == 4 and ctx.schedule_sam2_block(3) == 0  # frames 0-3, once
    got = ctx.gather_features(range(11))
    assert len(calls) == 11 and all(name.startswith("kfc-images") for name in calls)
    assert not ctx._sam2_jobs  # every resize started ahead was used
    assert torch.equal(got.low, ref.low) and all(torch.equal(a, b) for a, b in zip(got.high_res, ref.high_res))
    assert ctx.schedule_sam2_block(5) == 0  # encoded already: nothing to start
    naive = model.video_context(tok, frames, naive=True)
    assert naive.schedule_sam2_block(0) == 0
    ahead = model.video_context(tok, frames, encode_batch=4)  # the answers' decoding starts the first block
    assert ahead.prefetch_generations([(eval_prompt(TEXTS[0]), "uniform", None)]) == 1
    assert sorted(t for _, t in ahead._sam2_jobs) == [0, 1, 2, 3]


def test_prefetch_builds_images_ahead_and_tokenizes_each_prompt_once(tiny, monkeypatch):
    """predict_video: while one prompt prefix's images go through the ViT, the next prefix's images are
    already being built in the worker threads (each image once, all consumed); each distinct prompt is
    tokenized once though every mode and both planning and predicting need its ids; results equal building every image
    in the calling thread, bit for bit."""
    from projects.sasasa2va.hf.models import video_context as vc

    model, tok = tiny
    frames = _frames(14)
    texts = [eval_prompt(t) for t in TEXTS[:3]]
    fids = {i: _qlist(14, 30 + i) for i in range(3)}
    modes = ["uniform", "q_frame"]
    built, prompts = [], []
    kfc, tokenize = vc.kfc_image, vc.tokenize_prompt_split

    def counting_kfc(frames_, clip, which, grid, size):
        built.append((tuple(clip), which))
        return kfc(frames_, clip, which, grid, size)

    def counting_tokenize(tokenizer, prompt, cache):
        prompts.append(prompt)
        return tokenize(tokenizer, prompt, cache)

    monkeypatch.setattr(vc, "kfc_image", counting_kfc)
    monkeypatch.setattr(vc, "tokenize_prompt_split", counting_tokenize)
    with bench.ForcedAnswer(model, tok, "Sure, " + " ".join([SEG_TOKEN] * 10) + "."):
        monkeypatch.setattr(vc, "IMAGE_WORKERS", 1)
        ref = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=model.video_context(tok, frames))
        monkeypatch.setattr(vc, "IMAGE_WORKERS", 3)
        built.clear()
        prompts.clear()
        ctx = model.video_context(tok, frames)
        pending, vision_tokens = [], ctx.vision_tokens

        def spy(specs):
            pending.append(set(ctx._image_jobs))
            return vision_tokens(specs)

        ctx.vision_tokens = spy
        got = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=ctx)
    assert len(built) == len(set(built)) == ctx.counters.mllm_images_encoded
    assert len(prompts) == len(set(prompts)) == len(texts)  # a text's prompt is one string in every mode
    uniform = {k for k, _ in ctx.clip_image_specs(select_indices(14, "uniform", 100))}
    first_q = {k for k, _ in ctx.clip_image_specs(select_indices(14, "q_frame", 100, fids[0]))} - uniform
    assert first_q and first_q <= pending[0]  # uniform's prefix first; q_frame's images already started
    assert not ctx._image_jobs
    for m in modes:
        assert all(_same(a, b) for a, b in zip(ref[m], got[m])), m


def test_vision_tokens_batch_the_missing_images_without_exact_rows(tiny, monkeypatch):
    """exact_rows (CPU default): each missing image through the ViT alone; without it (the GPU default)
    the prompt's distinct missing images go VISION_BATCH per call -- same tokens up to rounding, each
    image encoded once, cached ones not again."""
    from projects.sasasa2va.hf.models import video_context as vc

    model, tok = tiny
    frames = _frames(14, seed=3)
    sizes = []
    original = type(model).extract_feature

    def spy(self, pixels):
        sizes.append(int(pixels.shape[0]))
        return original(self, pixels)

    monkeypatch.setattr(type(model), "extract_feature", spy)
    monkeypatch.setattr(vc, "VISION_BATCH", 8)
    out = {}
    for exact in (True, False):
        ctx = model.video_context(tok, frames, exact_rows=exact)
        specs = ctx.clip_image_specs(select_indices(14, "uniform", 100))
        sizes.clear()
        out[exact] = ctx.vision_tokens(specs[:6] + specs[:3])  # repeated keys: encoded once
        first = list(sizes)
        again = ctx.vision_tokens(specs[4:13])  # 2 cached, 7 new
        assert ctx.counters.mllm_images_encoded == 13
        assert sizes[len(first):] == ([1] * 7 if exact else [7])
        assert first == ([1] * 6 if exact else [6])
        assert torch.equal(again[:2], out[exact][4:6])
    torch.testing.assert_close(out[False], out[True], rtol=1e-4, atol=1e-5)


def test_lru_helpers_keep_the_most_recently_used_entries():
    cache = OrderedDict()
    for k in "abc":
        lru_put(cache, k, k.upper(), 2)
    assert list(cache) == ["b", "c"]          # "a" evicted first
    assert lru_get(cache, "b") == "B"         # a hit makes "b" the most recent ...
    lru_put(cache, "d", "D", 2)
    assert list(cache) == ["b", "d"]          # ... so "c" goes next
    assert lru_get(cache, "zzz") is None and list(cache) == ["b", "d"]
    lru_put(cache, "e", "E", 0)               # limit 0: caching off
    assert "e" not in cache


def _decode_calls(model, monkeypatch):
    """Spy on the SAM2 mask decoder: the number of pairs of each call (a lone pair on CPU counts 2)."""
    calls = []
    real = model.grounding_encoder.decode

    def spy(features, frame_ids, prompts, mode="train"):
        calls.append(len(frame_ids))
        return real(features, frame_ids, prompts, mode=mode)

    monkeypatch.setattr(model.grounding_encoder, "decode", spy)
    return calls


def test_prefetch_decodes_batches_across_answers_and_changes_nothing(tiny, monkeypatch):
    """predict_video decodes the SAM2 pairs of many answers together (prefetch_decodes): fewer, fuller
    mask-decoder calls, each distinct (answer, frame, [SEG]) pair once, and results and counters
    bit-identical to decoding per prediction -- also when the pair cache holds only part of a video's
    pairs (windows of requests), or less than one prediction's (then predict decodes as before)."""
    from projects.sasasa2va.hf.models import video_context as vc

    model, tok = tiny
    frames = _frames(13, seed=5)
    texts = [eval_prompt(t) for t in TEXTS[:3]]
    fids = {i: _qlist(13, 40 + i) for i in range(3)}
    modes = list(vc.MODES)
    answer = "Sure, " + " ".join(f"Clip_{k + 1} {SEG_TOKEN}" for k in range(10)) + "."
    low = model.grounding_encoder.low_res_size
    pair = low * low * 4
    with bench.ForcedAnswer(model, tok, answer):
        base_ctx = model.video_context(tok, frames)
        monkeypatch.setattr(base_ctx, "prefetch_decodes", lambda requests, options=None: len(requests))
        base_calls = _decode_calls(model, monkeypatch)
        base = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=base_ctx)
        monkeypatch.undo()
        runs = {}
        for name, cache in (("default", None), ("window", 90 * pair), ("tiny", 3 * pair)):
            ctx = model.video_context(tok, frames, pair_cache_bytes=cache)
            calls = _decode_calls(model, monkeypatch)
            covered = []
            real = ctx.prefetch_decodes

            def prefetch(requests, options=None, real=real, covered=covered):
                n = real(requests, options)
                covered.append(n)
                return n

            monkeypatch.setattr(ctx, "prefetch_decodes", prefetch)
            got = model.predict_video(frames, texts, tok, modes, selected_fids=fids, context=ctx)
            monkeypatch.undo()
            runs[name] = (ctx, calls, covered)
            for m in modes:
                for i in range(len(texts)):
                    assert _same(got[m][i], base[m][i]), (name, m, i)
            if name != "tiny":  # (a 3-pair cache evicts pairs that uniform_plus would reuse)
                assert ctx.counters.as_dict() == base_ctx.counters.as_dict(), name
    decodes = base_ctx.counters.sam2_decodes
    assert sum(base_calls) == decodes > 0
    ctx, calls, covered = runs["default"]
    assert covered == [len(texts) * len(modes)]  # one window: every request's pairs fit the cache
    assert sum(calls) == decodes and len(calls) == -(-decodes // ctx.decode_batch) < len(base_calls)
    ctx, calls, covered = runs["window"]
    assert len(covered) > 1 and sum(covered) == len(texts) * len(modes) and len(calls) < len(base_calls)
    ctx, calls, covered = runs["tiny"]
    assert set(covered) == {1} and ctx.counters.sam2_decodes >= decodes  # each prediction by predict


def test_prefetch_decodes_leaves_unplannable_requests_to_predict(tiny, monkeypatch):
    """Requests without a generated answer or with a Path C (memory propagation) plan are covered
    without any SAM2 work; an empty request list covers nothing."""
    from projects.sasasa2va.hf.models.frame_sampling import DecodePlan

    model, tok = tiny
    frames = _frames(9, seed=6)
    ctx = model.video_context(tok, frames)
    calls = _decode_calls(model, monkeypatch)
    requests = [(eval_prompt(t), "uniform", None) for t in TEXTS[:2]]
    assert ctx.prefetch_decodes([]) == 0
    assert ctx.prefetch_decodes(requests) == 2 and calls == []  # nothing generated yet
    with bench.ForcedAnswer(model, tok, "Sure, " + " ".join([SEG_TOKEN] * 10) + "."):
        ctx.prefetch_generations(requests)
    monkeypatch.setattr(ctx, "plan_for", lambda mode, indices, options: DecodePlan("C", [0, 4], [0, 1], 9, True))
    assert ctx.prefetch_decodes(requests) == 2 and calls == [] and ctx.counters.sam2_decodes == 0
    monkeypatch.undo()
    calls = _decode_calls(model, monkeypatch)
    assert ctx.prefetch_decodes(requests) == 2 and sum(calls) == ctx.counters.sam2_decodes > 0


def test_exact_sam2_decodes_do_not_depend_on_the_chunk(tiny):
    """With exact_rows each pair's low-res logits are the same bits whatever the chunk size, a chunk of
    one pair included (a batch of one runs other CPU kernels; a lone pair is decoded in a batch of two)."""
    from projects.sasasa2va.hf.models.inference import seg_prompts

    model, tok = tiny
    ctx = model.video_context(tok, _frames(7, seed=8))
    gen = torch.Generator().manual_seed(0)
    prompts = seg_prompts(model, torch.randn(9, model.language_model.config.hidden_size, generator=gen))
    frames = [i % 7 for i in range(9)]
    ctx.decode_batch = 4
    ref = ctx.decode_rows(frames, prompts)  # chunks of 4, 4, 1
    for size in (1, 2, 3, 9):
        ctx.decode_batch = size
        assert torch.equal(ctx.decode_rows(frames, prompts), ref), size
    assert ctx.counters.sam2_decodes == 5 * 9


def test_decode_batch_defaults_and_checks(tiny):
    """decode_batch None: DECODE_BATCH with exact rows (CPU) or naive, GPU_DECODE_BATCH for plain batched
    kernels; an explicit size is kept; sizes below 1 or not ints are refused."""
    from projects.sasasa2va.hf.models import video_context as vc

    model, tok = tiny
    frames = _frames(3)
    assert model.video_context(tok, frames).decode_batch == vc.DECODE_BATCH
    assert model.video_context(tok, frames, exact_rows=False).decode_batch == vc.GPU_DECODE_BATCH
    assert model.video_context(tok, frames, exact_rows=False, naive=True).decode_batch == vc.DECODE_BATCH
    assert model.video_context(tok, frames, decode_batch=5).decode_batch == 5
    for name in ("decode_batch", "encode_batch", "decode_batch_prompts"):
        for bad in (0, "4"):
            with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
                model.video_context(tok, frames, **{name: bad})
