"""Prompt templates and special-token strings the official checkpoints were fine-tuned with.

The strings are exact (spec model_training.md §2): the 4B model uses ``phi3_chat`` although its LLM is
Qwen2.5, so ``<|user|>`` etc. are plain text there. Changing a character changes the model's input.
"""
from __future__ import annotations

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
SEG_TOKEN = "[SEG]"
SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
IGNORE_INDEX = -100

PROMPT_TEMPLATES = {
    "phi3_chat": dict(
        SYSTEM="<|system|>\n{system}<|end|>\n",
        INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        SUFFIX="<|end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|end|>"],
    ),
    "internlm2_chat": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|im_end|>"],
    ),
    "qwen_chat": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|im_end|>", "<|endoftext|>"],
    ),
}


def get_template(name: str) -> dict:
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[name]


def image_token_string(num_images: int, tokens_per_image: int) -> str:
    """`<img>` + N x `<IMG_CONTEXT>` + `</img>` per image, images joined by newlines."""
    block = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * tokens_per_image + IMG_END_TOKEN
    return "\n".join([block] * num_images)


def eval_prompt(expression: str) -> str:
    """The evaluation question (spec evaluation.md §2.1).

    Robustness fix (§11.2): an expression containing '?' is used verbatim as the question but still
    gets the ``<image>`` placeholder, so image tokens are always inserted.
    """
    if "?" in expression:
        return "<image>\n" + expression
    return "<image>\nPlease segment {}.".format(expression)


def seg_answer(num_clips: int) -> str:
    """`Clip_1 [SEG], Clip_2 [SEG], ..., Clip_N [SEG].` (one [SEG] per clip, in clip order)."""
    return ", ".join(f"Clip_{i + 1} {SEG_TOKEN}" for i in range(num_clips)) + "."
