"""Training conversations: question/answer wording and tokenisation into input_ids / labels.

Tokenisation follows spec model_training_reference.md §5.6 exactly: every piece (instruction,
answer + suffix, separator) is tokenised on its own and the ids are concatenated, because
tokenising the joined string would merge tokens across piece borders and change the ids the
checkpoints were fine-tuned on.
"""
from __future__ import annotations

from typing import NamedTuple

from projects.sasasa2va.hf.models.templates import IGNORE_INDEX, SEG_TOKEN, get_template, seg_answer

_QUESTION_TEMPLATES = [
    "Please segment {class_name} in this image.",
    "Can you segment the {class_name} in this image?",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask.",
    "Could you locate the {class_name} in this image and give its segmentation mask?",
    "Which part of this picture is the {class_name}? Can you output the segmentation mask?",
    "Please highlight the {class_name} in this image with a segmentation mask.",
    "Find the {class_name} in this image and answer with a segmentation mask.",
    "Segment the {class_name} shown in this picture, please.",
]
# 8 distinct templates, each listed twice (same draw distribution as the reference's 16 entries). The
# spec names only the first three; the other five are worded here (README, "Known differences").
SEG_QUESTIONS = _QUESTION_TEMPLATES + _QUESTION_TEMPLATES

ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]


def video_answers(num_clips: int = 10) -> list[str]:
    """The five answer patterns with '[SEG].' replaced by 'Clip_1 [SEG], ..., Clip_N [SEG].'."""
    seg_str = seg_answer(num_clips)
    return [a.replace("[SEG].", seg_str) for a in ANSWER_LIST]


def _rand_index(rng, n: int) -> int:
    """Uniform index in [0, n) from a numpy Generator / RandomState or a random.Random."""
    if hasattr(rng, "integers"):
        return int(rng.integers(n))
    if hasattr(rng, "randint") and hasattr(rng, "rand"):  # numpy RandomState
        return int(rng.randint(n))
    return int(rng.randrange(n))


def format_question(expression: str, rng, verbatim_question_mark: bool = True, lowercase: bool = True,
                    remove_periods: bool = True) -> str:
    """Question for one referring expression (spec model_training.md §2).

    An expression containing '?' is a question already and is used verbatim. Otherwise all '.' are
    removed (`remove_periods`), the text is stripped, lowercased (`lowercase`) and put into a random
    SEG_QUESTIONS template. Ref-SAV uses all three flags False; RefCOCO pre-cleans its phrase and
    passes remove_periods=False, lowercase=False.
    """
    if verbatim_question_mark and "?" in expression:
        return expression
    text = expression.replace(".", "") if remove_periods else expression
    text = text.strip()
    if lowercase:
        text = text.lower()
    template = SEG_QUESTIONS[_rand_index(rng, len(SEG_QUESTIONS))]
    return template.format(class_name=text)


def build_turns(expressions, rng, num_clips: int | None, image_token_str: str, **question_kwargs) -> list[dict]:
    """One {"input", "output"} turn per expression; the first input starts with the image tokens + '\\n'.

    num_clips=None gives image answers (one [SEG]); an int gives video answers with num_clips [SEG].
    Extra keyword arguments go to :func:`format_question`.
    """
    expressions = list(expressions)
    if not expressions:
        raise ValueError("build_turns: expected at least one expression, got none")
    if not image_token_str:
        raise ValueError("build_turns: image_token_str is empty; the first turn must carry the image tokens")
    answers = ANSWER_LIST if num_clips is None else video_answers(num_clips)
    turns = []
    for k, exp in enumerate(expressions):
        question = format_question(exp, rng, **question_kwargs)
        if k == 0:
            # '<image>\n' + question with <image> replaced by the token string (image: then strip()).
            question = image_token_str + "\n" + question
            if num_clips is None:
                question = question.strip()
        turns.append({"input": question, "output": answers[_rand_index(rng, len(answers))]})
    return turns


def get_bos_token_ids(tokenizer) -> list[int]:
    """BOS ids put before the first turn: none for Qwen tokenizers, else the tokenizer's BOS if any."""
    if "qwen" in type(tokenizer).__name__.lower():
        return []
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def seg_token_id(tokenizer) -> int:
    """Id of '[SEG]', looked up by encoding it without special tokens (must be a single token)."""
    ids = tokenizer.encode(SEG_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer encodes {SEG_TOKEN!r} as {ids}; expected one id "
                         f"(add the special tokens {SEG_TOKEN!r} etc. to the tokenizer first)")
    return int(ids[0])


class EncodedConversation(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    num_seg: int  # [SEG] tokens left after truncation (compare with the expected count)


def encode_conversation(tokenizer, template_name: str, turns, max_length: int = 12288) -> EncodedConversation:
    """Tokenise turns into (input_ids, labels, num_seg) as spec model_training_reference.md §5.6.

    Per turn i: INSTRUCTION.format(input=..., round=i+1) -> labels -100; output + SUFFIX ->
    supervised; SEP -> labels -100. BOS (labels -100) only before turn 0; no EOS. Truncation keeps
    the first max_length tokens; num_seg counts the [SEG] ids kept so the caller can drop a sample
    whose [SEG] were cut.
    """
    template = get_template(template_name)
    turns = list(turns)
    if not turns:
        raise ValueError("encode_conversation: expected at least one turn, got none")
    if max_length < 1:
        raise ValueError(f"encode_conversation: max_length must be >= 1, got {max_length}")

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    input_ids: list[int] = []
    labels: list[int] = []
    for i, turn in enumerate(turns):
        if "input" not in turn or "output" not in turn:
            raise ValueError(f"encode_conversation: turn {i} must have 'input' and 'output' keys, "
                             f"got {sorted(turn)}")
        if i == 0:
            bos = get_bos_token_ids(tokenizer)
            input_ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        ids = enc(template["INSTRUCTION"].format(input=turn["input"], round=i + 1))
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        ids = enc(turn["output"] + template["SUFFIX"])
        input_ids += ids
        labels += ids
        ids = enc(template["SEP"])
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
    input_ids = input_ids[:max_length]
    labels = labels[:max_length]
    seg_id = seg_token_id(tokenizer)
    return EncodedConversation(input_ids, labels, sum(1 for t in input_ids if t == seg_id))
