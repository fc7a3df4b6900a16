"""tools/diagnose_tiny.py helpers: which question each [SEG] answers, and the colour oracle."""
import numpy as np
import pytest
import torch

from projects.sasasa2va.datasets.conversation import build_turns, encode_conversation
from projects.sasasa2va.datasets.synthetic import COLORS
from projects.sasasa2va.hf.models.templates import (
    IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, SPECIAL_TOKENS, image_token_string)
from projects.sasasa2va.models.tiny import build_tiny_tokenizer
from tools.diagnose_tiny import add_offsets, colour_of_target, main, scale_last_linear, user_question_tokens


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer(0)
    tok.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    return tok


def test_each_seg_maps_to_its_own_question(tokenizer):
    expressions = ["the red circle", "the blue star", "the green square"]
    turns = build_turns(expressions, np.random.default_rng(0), 10, image_token_string(2, 4))
    ids = torch.tensor(encode_conversation(tokenizer, "qwen_chat", turns).input_ids)
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    skip = {tokenizer.convert_tokens_to_ids(t) for t in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)}
    rows = user_question_tokens(ids, tokenizer, seg_id, skip)
    assert len(rows) == 30
    for k, expression in enumerate(expressions):
        texts = {tokenizer.decode(r) for r in rows[10 * k:10 * (k + 1)]}
        assert len(texts) == 1
        text = texts.pop()
        assert expression.split()[1] in text  # its own colour ...
        assert all(e.split()[1] not in text for e in expressions if e != expression)  # ... and no other
        assert IMG_CONTEXT_TOKEN not in text and "[SEG]" not in text


def test_colour_oracle_reads_gt_pixels():
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    names = list(COLORS)
    frames = [torch.full((3, 32, 32), 128, dtype=torch.uint8) for _ in range(2)]
    frames[0][:, 4:12, 4:12] = torch.tensor(COLORS["blue"], dtype=torch.uint8)[:, None, None]
    frames[1][:, 20:30, 20:30] = torch.tensor(COLORS["yellow"], dtype=torch.uint8)[:, None, None]
    masks = torch.zeros(4, 16, 16)  # 2 objects x 2 frames, object-major, at another resolution
    masks[0, 2:6, 2:6] = 1            # object 0, frame 0: the blue square
    masks[1, 10:15, 10:15] = 1        # object 0, frame 1: the yellow square
    # object 1 is absent in frame 0 and frame 1 -> "none" index
    idx = colour_of_target(masks, frames, 2, palette).tolist()
    assert idx == [names.index("blue"), names.index("yellow"), len(names), len(names)]


def test_scale_last_linear_scales_the_prompt_head_output():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.Dropout(0.0))
    x = torch.randn(5, 8)
    before = head(x).detach()
    first = head[0].weight.detach().clone()
    assert scale_last_linear(head, 6.0) is head[2]
    torch.testing.assert_close(head(x), before * 6.0)
    assert torch.equal(head[0].weight, first)  # only the last Linear changes
    with pytest.raises(ValueError, match="no nn.Linear"):
        scale_last_linear(torch.nn.ReLU(), 2.0)


def test_add_offsets_gives_shared_and_per_clip_parts_of_the_asked_size():
    torch.manual_seed(0)
    frames, objs, width = 3, 2, 16
    lang = torch.randn(objs * frames, width)
    spread = lang.std(0).norm()
    offset, clips = torch.randn(width), torch.randn(8, width)
    out = add_offsets(lang, frames, offset, clips, 7.0, 0.0)
    shift = out - lang
    assert torch.allclose(shift, shift[:1].expand_as(shift))  # the same vector on every prompt
    assert torch.allclose(shift[0].norm(), 7.0 * spread)
    out = add_offsets(lang, frames, offset, clips, 0.0, 1.5)
    shift = (out - lang).view(objs, frames, width)
    assert torch.allclose(shift[0], shift[1])  # object-major: clip t gets the same vector for each object
    assert not torch.allclose(shift[0, 0], shift[0, 1])
    assert torch.allclose(shift.norm(dim=-1), torch.full((objs, frames), 1.5 * float(spread)))
    assert torch.equal(add_offsets(lang, frames, offset, clips, 0.0, 0.0), lang)
    with pytest.raises(ValueError, match="2 clip vectors for 3 frames"):
        add_offsets(lang, frames, offset, clips[:2], 0.0, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "model", "--oracle-offset", "2"], "apply to oracle prompts, not --prompt model"),
    (["--prompt", "oracle-colour", "--prompt-scale", "0"], "--prompt-scale > 0"),
    (["--prompt", "model", "--model-after", "10"], "--model-after needs an oracle --prompt"),
    (["--prompt", "oracle-colour", "--iters", "10", "--model-after", "10"], "0 <= K < --iters"),
])
def test_cli_rejects_oracle_options_on_the_model_path(argv, message, capsys):
    """Refused as usage errors naming the option, before any model or data is looked for."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "not found" not in err
