"""``fedlora eval`` with lm-evaluation-harness, offline, on the two shipped tasks; and the one
prompt template: training, the server's held-out evaluation and ``fedlora eval`` encode the
same (prompt, answer) tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fl_harness import run_rounds, save_tiny_llama, tiny_config

from fedlora import config
from fedlora.cli.main import main
from fedlora.learning import builders, data, prompts
from fedlora.learning import client_round as client

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (fedlora[eval])")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny(path, chat: bool) -> str:
    return save_tiny_llama(path, chat_template=CHATML if chat else None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 1-round fedit run of a tiny Llama whose tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("lmeval")
    flat = tiny_config(**{"model.name": _tiny(root / "base", chat=True),
                          "model.task": "causal-lm", "data.source": "chatterbot",
                          "data.partitioner": "natural", "lora.target-modules": "q_proj,v_proj",
                          "data.max-length": 48, "num-server-rounds": 1, "train.lr": 0.01})
    _, _, glob, server_model = run_rounds(flat)
    server_model.export(glob, root / "run" / "adapter")
    return root / "run", flat, server_model


def _requests(task_name, model, tokenizer, tokenizer_dir, limit):
    from lm_eval.tasks import TaskManager, get_task_dict

    from fedlora.learning import lmeval

    lm = lmeval.lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    manager = TaskManager(include_path=str(lmeval.TASKS_DIR),
                          metadata={"tokenizer": tokenizer_dir})
    task = get_task_dict([task_name], manager)[task_name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return lm, task


def test_training_server_and_lm_eval_encode_the_same_tokens(trained_run):
    run, flat, server_model = trained_run
    from fedlora.learning import lmeval

    model, tokenizer, tokenizer_dir = lmeval.load(run)
    assert tokenizer.chat_template  # the chat-template branch of the one template
    lm, task = _requests("fedlora-chatterbot-qa", model, tokenizer, tokenizer_dir, None)
    from_eval = []
    for inst in task.instances:
        context, answer = lm._encode_pair(*inst.args)
        from_eval.append((context + answer)[:flat["data.max-length"]])
    server = [ex["input_ids"] for ex in server_model.examples]
    cfg = config.from_flat(flat)
    node = client.Node(partition_id=0, num_partitions=3, rank=cfg.lora.r)
    federated = [ex["input_ids"] for ex in client.heldout_examples(cfg, node, tokenizer)]
    assert len(server) == cfg.data.eval_samples
    assert from_eval[:len(server)] == server == federated  # token for token
    # the scored tokens too: lm-eval's continuation is exactly the labels training trains on
    inst = task.instances[0]
    context, answer = lm._encode_pair(*inst.args)
    labels = server_model.examples[0]["labels"]
    assert [t for t in labels if t != data.IGNORE_INDEX] == answer[:len(labels) - len(context)]
    assert answer[-1] == tokenizer.eos_token_id
    # training: a client's training examples are the same function of its rows
    rows = client.train_rows(cfg, node)
    trained = client.train_examples(cfg, node, tokenizer)
    pairs = [prompts.encode_pair(tokenizer, q, a) for q, a in
             zip(rows["instruction"], rows["response"], strict=True)]
    assert [ex["input_ids"] for ex in trained] == \
        [(p + a)[:cfg.data.max_length] for p, a in pairs][:len(trained)]


def test_plain_lm_eval_encoding_would_score_other_tokens(trained_run):
    """What FedloraLM fixes: lm-eval's own pair encoding moves the prompt's trailing newline
    into the answer and scores no EOS."""
    from lm_eval.models.huggingface import HFLM

    from fedlora.learning import lmeval

    run, _, server_model = trained_run
    model, tokenizer, tokenizer_dir = lmeval.load(run)
    lm, task = _requests("fedlora-chatterbot-qa", model, tokenizer, tokenizer_dir, 1)
    ours = lm._encode_pair(*task.instances[0].args)
    theirs = HFLM._encode_pair(lm, *task.instances[0].args)
    assert ours != theirs


def test_fedlora_eval_runs_both_shipped_tasks_offline(trained_run, capsys):
    run, flat, _ = trained_run
    assert main(["eval", "--list-tasks"]) == 0
    listed = capsys.readouterr().out
    assert "fedlora-bbc-topic" in listed and "fedlora-chatterbot-qa" in listed

    assert main(["eval", str(run), "--tasks", "fedlora-bbc-topic,fedlora-chatterbot-qa",
                 "--limit", "5"]) == 0
    printed = capsys.readouterr().out
    bbc = json.loads((run / "eval" / "fedlora-bbc-topic.json").read_text())
    qa = json.loads((run / "eval" / "fedlora-chatterbot-qa.json").read_text())
    assert "fedlora-bbc-topic" in printed and "perplexity" in printed
    assert bbc["metrics"]["n-samples"] == 5 and 0.0 <= bbc["metrics"]["acc"] <= 1.0
    assert qa["metrics"]["n-samples"] == 5
    # the perplexity is exp(-mean answer log-likelihood) of the first 5 held-out answers,
    # recomputed here from the run's own tokenization
    from fedlora.learning import lmeval

    model, tokenizer, _ = lmeval.load(run)
    cfg = config.from_flat(flat)
    rows = data.train_test_split(data.load_corpus(builders.data_spec(cfg)),
                                 data.DataSpec(source="chatterbot", task="causal-lm"))[1]
    lls = []
    for q, a in zip(rows["instruction"][:5], rows["response"][:5], strict=True):
        p_ids, a_ids = prompts.encode_pair(tokenizer, q, a)
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        lls.append(sum(float(logp[len(p_ids) + i - 1, t]) for i, t in enumerate(a_ids)))
    assert qa["metrics"]["perplexity"] == pytest.approx(math.exp(-sum(lls) / 5), rel=1e-4)


def test_fedlora_eval_names_an_unknown_task(trained_run, capsys):
    run, _, _ = trained_run
    assert main(["eval", str(run), "--tasks", "no-such-task"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
