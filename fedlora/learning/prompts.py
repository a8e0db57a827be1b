"""The one prompt template of causal-LM runs: training, the server's held-out evaluation,
the per-round samples and ``fedlora eval`` all render an instruction through :func:`render`
and encode a (prompt, answer) pair through :func:`encode_pair`.

The template is the tokenizer's own chat template when it has one (one user turn, then the
assistant's generation prompt), else the Alpaca-style ``### Instruction:`` / ``### Response:``
layout. The prompt and the answer are tokenized separately, without special tokens, and the
answer ends with EOS: the model learns to stop, and evaluation scores exactly the tokens
training scored.
"""

from __future__ import annotations

from typing import Any

FALLBACK = "### Instruction:\n{instruction}\n\n### Response:\n"


def render(tokenizer: Any, instruction: str) -> str:
    """The prompt text for ``instruction`` (ends where the model's answer starts)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False,
            add_generation_prompt=True,
        )
    return FALLBACK.format(instruction=instruction)


_SENTINEL = "\x00fedlora-instruction\x00"


def generation_suffix(tokenizer: Any) -> str:
    """What every rendered prompt ends with after the instruction (e.g. ``"\\n\\n### Response:\\n"``
    or the chat template's end-of-turn and assistant header): a context that ends with it was
    rendered by :func:`render`."""
    text = render(tokenizer, _SENTINEL)
    return text[text.index(_SENTINEL) + len(_SENTINEL):]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered prompt (no special tokens added: the template holds them)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an answer as trained and scored: ``answer + EOS``."""
    return list(tokenizer(answer + (tokenizer.eos_token or ""),
                          add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, instruction: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)`` of one instruction/answer pair."""
    return (encode_prompt(tokenizer, render(tokenizer, instruction)),
            encode_answer(tokenizer, answer))
