"""tools/diagnose_tiny.py helpers: which question each [SEG] answers, and the colour oracle."""
import numpy as np
import pytest
import torch

from projects.sasasa2va.datasets.conversation import build_turns, encode_conversation
from projects.sasasa2va.datasets.synthetic import COLORS
from projects.sasasa2va.hf.models.templates import (
    IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, SPECIAL_TOKENS, image_token_string)
from projects.sasasa2va.models.tiny import build_tiny_tokenizer
from tools.diagnose_tiny import colour_of_target, user_question_tokens


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
