"""Datasets of the shipped lm-eval tasks, over fedlora's packaged (offline) corpora.

lm-eval calls these through ``custom_dataset: !function tasks.<name>`` with the task's
metadata; ``tokenizer`` (a directory or hub id; ``fedlora eval`` passes the model's) renders
each prompt with :func:`fedlora.learning.prompts.render`, the template training used. The rows are
the
corpus's seeded held-out split (``data.test-fraction`` = 0.2, ``seed`` = 0: the defaults), so
a run with default data settings never trained on them.
"""

from __future__ import annotations

from typing import Any

import datasets

BBC_CHARS = 600  # article characters in the prompt (the lead paragraphs carry the topic)
BBC_INSTRUCTION = ("What is the topic of this BBC news article? Answer with one word: "
                   "{choices}.\n\n{text}")


def _tokenizer(metadata: dict[str, Any]) -> Any:
    path = metadata.get("tokenizer")
    if not path:
        raise ValueError("the fedlora-* tasks render prompts with the model's template: pass "
                         "--metadata '{\"tokenizer\": \"MODEL_DIR\"}' to lm_eval, or run them "
                         "with `fedlora eval`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _heldout(source: str, task: str, metadata: dict[str, Any]) -> datasets.Dataset:
    from fedlora.learning import data

    spec = data.DataSpec(source=source, task=task,
                         test_fraction=float(metadata.get("test_fraction", 0.2)),
                         seed=int(metadata.get("seed", 0)))
    return data.train_test_split(data.load_corpus(spec), spec)[1]


def chatterbot_qa(**metadata: Any) -> dict[str, datasets.Dataset]:
    """Chatterbot Q/A held-out pairs: ``prompt`` (rendered) and ``response``."""
    from fedlora.learning import prompts

    tokenizer = _tokenizer(metadata)
    rows = _heldout("chatterbot", "causal-lm", metadata)
    rows = rows.map(lambda r: {"prompt": prompts.render(tokenizer, r["instruction"])})
    return {"test": rows}


def bbc_topic(**metadata: Any) -> dict[str, datasets.Dataset]:
    """BBC News held-out articles: ``prompt`` (rendered), ``choices`` (topic names), ``label``."""
    from fedlora.learning import assets, prompts

    tokenizer = _tokenizer(metadata)
    names = sorted(p.name for p in assets.bbc_news_dir().iterdir() if p.is_dir())
    rows = _heldout("bbc-news", "seq-cls", metadata)

    def one(r: dict[str, Any]) -> dict[str, Any]:
        text = " ".join(r["text"].split())[:BBC_CHARS]
        return {"prompt": prompts.render(tokenizer, BBC_INSTRUCTION.format(
            choices=", ".join(names), text=text)), "choices": names}

    return {"test": rows.map(one)}
