"""Conversation wording and tokenisation (spec model_training_reference.md §4, §5.6)."""
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from projects.sasasa2va.datasets.conversation import (
    ANSWER_LIST, SEG_QUESTIONS, build_turns, encode_conversation, format_question, get_bos_token_ids,
    seg_token_id, video_answers)
from projects.sasasa2va.hf.models.templates import (
    IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, PROMPT_TEMPLATES, SPECIAL_TOKENS,
    image_token_string)

CORPUS = [
    "<|user|>\nPlease segment the red car in this image.<|end|>\n<|assistant|>\nSure, it is Clip_1",
    "<|im_start|>user\nCan you segment the dog?<|im_end|>\n<|im_start|>assistant\nIt is the result.",
    "Where is the person walking to the left in this picture? Please respond with a segmentation mask.",
    "the cat which jumps over the fence, the bird flying away, the man in black",
]


def _train(cls=PreTrainedTokenizerFast):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    fast = cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS +
                             [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN]})
    return fast


class FakeQwen2TokenizerFast(PreTrainedTokenizerFast):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    return _train()


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_wording_lists():
    assert len(SEG_QUESTIONS) == 16 and len(set(SEG_QUESTIONS)) == 8
    assert all(SEG_QUESTIONS.count(q) == 2 and "{class_name}" in q for q in SEG_QUESTIONS)
    assert sum(q.endswith("segmentation mask?") for q in set(SEG_QUESTIONS)) == 2
    assert ANSWER_LIST == ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].",
                           "Sure, the segmentation result is [SEG].", "[SEG]."]
    va = video_answers(10)
    seg = ", ".join(f"Clip_{i} [SEG]" for i in range(1, 11)) + "."
    assert va == ["It is " + seg, "Sure, " + seg, "Sure, it is " + seg,
                  "Sure, the segmentation result is " + seg, seg]
    assert all(a.count("[SEG]") == 10 for a in va)
    assert video_answers(3)[4] == "Clip_1 [SEG], Clip_2 [SEG], Clip_3 [SEG]."


def test_format_question():
    rng = random.Random(0)
    assert format_question("Which Dog is Running?", rng) == "Which Dog is Running?"
    q = format_question("  The Red.Car. ", rng)
    assert q in {t.format(class_name="the redcar") for t in SEG_QUESTIONS}
    q = format_question("The Red.Car?", rng, verbatim_question_mark=False, lowercase=False, remove_periods=False)
    assert "The Red.Car?" in q and q != "The Red.Car?"
    # numpy generators work too and draws cover the 8 templates
    g = np.random.default_rng(0)
    seen = {format_question("x", g) for _ in range(200)}
    assert len(seen) == 8


def test_build_turns_video_and_image():
    img = image_token_string(2, 3)
    turns = build_turns(["the cat", "Is it a dog?"], random.Random(1), 10, img)
    assert len(turns) == 2
    assert turns[0]["input"].startswith(img + "\n") and img not in turns[1]["input"]
    assert turns[1]["input"] == "Is it a dog?"
    assert all(t["output"] in video_answers(10) for t in turns)
    image_turns = build_turns(["the cat"], random.Random(1), None, img)
    assert image_turns[0]["input"].startswith(img + "\n") and image_turns[0]["output"] in ANSWER_LIST


def test_encode_labels_and_pieces(tokenizer):
    img = image_token_string(2, 4)
    turns = [{"input": img + "\nPlease segment the cat.", "output": video_answers(10)[2]},
             {"input": "Where is the dog?", "output": video_answers(10)[4]}]
    t = PROMPT_TEMPLATES["phi3_chat"]
    ids, labels, num_seg = encode_conversation(tokenizer, "phi3_chat", turns)
    bos = [tokenizer.bos_token_id]
    exp_ids, exp_labels = list(bos), [IGNORE_INDEX]
    for turn in turns:
        a = enc(tokenizer, t["INSTRUCTION"].format(input=turn["input"]))
        b = enc(tokenizer, turn["output"] + t["SUFFIX"])
        c = enc(tokenizer, t["SEP"])
        exp_ids += a + b + c
        exp_labels += [IGNORE_INDEX] * len(a) + b + [IGNORE_INDEX] * len(c)
    assert ids == exp_ids and labels == exp_labels
    assert num_seg == 20 and ids.count(seg_token_id(tokenizer)) == 20
    assert ids.count(tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)) == 8
    # supervised text = answers + suffixes only; no EOS anywhere
    supervised = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "".join(tu["output"] + t["SUFFIX"] for tu in turns)
    assert tokenizer.eos_token_id not in ids
    # separator after every turn, unsupervised; the sequence ends with it
    sep = enc(tokenizer, "\n")
    assert ids[-len(sep):] == sep and labels[-len(sep):] == [IGNORE_INDEX] * len(sep)
    first_turn_end = 1 + len(enc(tokenizer, t["INSTRUCTION"].format(input=turns[0]["input"]))) + \
        len(enc(tokenizer, turns[0]["output"] + t["SUFFIX"]))
    assert ids[first_turn_end:first_turn_end + len(sep)] == sep
    assert labels[first_turn_end:first_turn_end + len(sep)] == [IGNORE_INDEX] * len(sep)


def test_bos_rules(tokenizer):
    assert get_bos_token_ids(tokenizer) == [tokenizer.bos_token_id]
    qwen = _train(FakeQwen2TokenizerFast)
    assert get_bos_token_ids(qwen) == []
    turns = [{"input": "hi", "output": "[SEG]."}, {"input": "again", "output": "[SEG]."}]
    ids, labels, _ = encode_conversation(qwen, "qwen_chat", turns)
    assert ids[:3] == enc(qwen, "<|im_start|>user\nhi")[:3] and qwen.bos_token_id not in ids
    ids, labels, _ = encode_conversation(tokenizer, "internlm2_chat", turns)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX


def test_truncation_counts_seg(tokenizer):
    turns = [{"input": "Please segment the cat.", "output": video_answers(10)[4]}] * 3
    full, _, n_full = encode_conversation(tokenizer, "phi3_chat", turns)
    assert n_full == 30
    seg = seg_token_id(tokenizer)
    cut = [i for i, t in enumerate(full) if t == seg][14]  # keep 14 [SEG]
    ids, labels, n = encode_conversation(tokenizer, "phi3_chat", turns, max_length=cut)
    assert len(ids) == len(labels) == cut and ids == full[:cut] and n == 14


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="template"):
        encode_conversation(tokenizer, "vicuna", [{"input": "a", "output": "b"}])
    with pytest.raises(ValueError, match="'input' and 'output'"):
        encode_conversation(tokenizer, "phi3_chat", [{"input": "a"}])
    with pytest.raises(ValueError, match="image_token_str"):
        build_turns(["a"], random.Random(0), 10, "")
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        seg_token_id(plain_without_seg())


def plain_without_seg():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)
