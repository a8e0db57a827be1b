"""``fedlora eval``: lm-evaluation-harness tasks on a run's model (``pip install 'fedlora[eval]'``).

The model is the run's base with its adapter merged (:func:`fedlora.learning.export.merged_model`,
the
same model ``fedlora export --merged`` writes), or a merged export directory. It is handed to
lm-eval's ``HFLM`` as an instance, through :class:`FedloraLM`, which changes one thing: a
request whose context was rendered by :func:`fedlora.learning.prompts.render` (it ends with the
template's generation suffix) is encoded as training encodes it — prompt and answer
tokenized separately, answer + EOS (:func:`fedlora.learning.prompts.encode_pair`). lm-eval's own
encoding would move the prompt's trailing newline into the scored answer and drop the EOS, so
its scores would be of other tokens than the ones trained. Other requests (hub tasks such as
``mmlu``) are encoded by lm-eval unchanged.

Shipped tasks (``fedlora/learning/eval_tasks/``, offline): ``fedlora-bbc-topic``,
``fedlora-chatterbot-qa``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlora.errors import FedLoraError

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"


def shipped_tasks() -> list[str]:
    """The lm-eval task names fedlora ships (its YAML files), sorted."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise FedLoraError("fedlora eval needs lm-evaluation-harness, which is not installed: "
                           "pip install 'fedlora[eval]'") from None


def lm_class() -> type:
    """:class:`FedloraLM` (defined on first use: lm-eval is an optional dependency)."""
    _require()
    from lm_eval.models.huggingface import HFLM

    from fedlora.learning import prompts

    class FedloraLM(HFLM):
        """HFLM that scores templated prompts exactly as fedlora trains them."""

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if context.endswith(prompts.generation_suffix(self.tokenizer)):
                return (prompts.encode_prompt(self.tokenizer, context),
                        prompts.encode_answer(self.tokenizer, continuation))
            return super()._encode_pair(context, continuation)

    return FedloraLM


def load(path: str | Path) -> tuple[Any, Any, str]:
    """``(model, tokenizer, tokenizer_dir)`` of a run / adapter (merged in memory) or of a
    merged export directory."""
    p = Path(path).expanduser().resolve()
    from fedlora.learning.export import MERGED_MANIFEST

    if (p / MERGED_MANIFEST).is_file() or ((p / "config.json").is_file()
                                          and not (p / "adapter_config.json").is_file()
                                          and not (p / "adapter").is_dir()):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p), \
            str(p)
    from fedlora.learning.export import merged_model
    from fedlora.learning.loading import _adapter_dir

    model, tokenizer, info = merged_model(p)
    if info["task"] != "causal-lm":
        raise FedLoraError(f"{p} is a {info['task']} run; lm-eval tasks score a causal LM "
                           f"(model.task = 'causal-lm')")
    return model, tokenizer, str(_adapter_dir(p))


def evaluate(model: Any, tokenizer: Any, tokenizer_dir: str, tasks: list[str],
             limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
             device: str = "cpu") -> dict[str, dict[str, Any]]:
    """lm-eval's results per task: ``{task: {metric: value, ...}}`` plus ``n-samples``."""
    _require()
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                    device=device)
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"tokenizer": tokenizer_dir})
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise FedLoraError(f"unknown lm-eval task(s) {unknown}; shipped: "
                           f"{', '.join(shipped_tasks())} (`fedlora eval --list-tasks`), or a "
                           f"task of lm-eval's catalogue (`lm_eval --tasks list`)")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    results = {}
    for task in tasks:
        metrics = {k.split(",")[0]: v for k, v in out["results"][task].items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and k.split(",")[0] not in ("sample_len",)
                   and not k.split(",")[0].endswith("_stderr")}
        metrics["n-samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = metrics
    return results


def write(results: dict[str, dict[str, Any]], directory: Path, extra: dict[str, Any]) -> list[Path]:
    """``directory/<task>.json`` per task."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, metrics in results.items():
        path = directory / f"{task}.json"
        path.write_text(json.dumps({"task": task, "metrics": metrics, "time": time.time(),
                                    **extra}, indent=2, default=str))
        paths.append(path)
    return paths


def table(results: dict[str, dict[str, Any]]) -> str:
    """``results`` as a fixed-width text table: one line per task and metric."""
    lines = [f"{'task':28} {'metric':12} {'value':>10}"]
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "n-samples":
                continue
            shown = f"{value:10.4f}" if isinstance(value, float) else f"{value!s:>10}"
            lines.append(f"{task:28} {key:12} {shown}")
    return "\n".join(lines)
