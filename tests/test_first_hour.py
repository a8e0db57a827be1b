"""The first hour with your own data (issue 19): each mistake a new user made is caught before
training, with a message that names the key or file, what was expected and what to change.

CLI checks run ``fedlora run`` through :func:`fedlora.cli.main.main` with Flower's launcher replaced
by a spy: a refused run never starts a SuperLink, and the message arrives within seconds.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fl_harness import tiny_config
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import app as client_app
from fedlora import config
from fedlora.cli import main as cli
from fedlora.errors import DataError, FedLoraError
from fedlora.federation import outputs
from fedlora.learning import builders, data, training
from fedlora.learning import client_round as client
from fedlora.runtime import run_setup
from server.app import DataScreenedGrid, main
from server.inprocess import InProcessGrid

REPO = Path(__file__).resolve().parents[1]
SECONDS = 30.0  # "within seconds" on a loaded 2-core machine (imports included)
TEXTS = ["markets rallied as shares rose", "the film won an award", "parliament voted today",
         "the team won the final", "a new phone chip was launched"]


def write_rows(path: Path, n: int, labels: Any = None, drop: str | None = None) -> Path:
    """``n`` classification rows; ``labels(i)`` gives row i's label (default ``i % 5``)."""
    with path.open("w") as fh:
        for i in range(n):
            row = {"text": f"{TEXTS[i % 5]} {i}", "label": labels(i) if labels else i % 5}
            if drop:
                row.pop(drop)
            fh.write(json.dumps(row) + "\n")
    return path


def sites(tmp_path: Path, n: int = 3, rows: int = 40, **kw: Any) -> str:
    for i in range(n):
        write_rows(tmp_path / f"site-{i}.jsonl", rows, **kw)
    return str(tmp_path / "site-{partition-id}.jsonl")


class Launcher:
    """Stands in for ``fedlora.runtime.launcher.run_simulation`` (what starts the SuperLink)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict]:
        self.calls += 1
        return [{"round": 0}]


@pytest.fixture
def launcher(monkeypatch) -> Launcher:
    from fedlora.runtime import launcher as module

    spy = Launcher()
    monkeypatch.setattr(module, "run_simulation", spy)
    return spy


def fedlora_run(tmp_path: Path, *overrides: str, clients: int = 3) -> tuple[int, float]:
    started = time.perf_counter()
    rc = cli.main(["run", "--num-clients", str(clients), "--out", str(tmp_path / "out"),
                   *[a for text in overrides for a in ("-c", text)]])
    return rc, time.perf_counter() - started


def refused(capsys, launcher: Launcher, rc: int, seconds: float) -> str:
    """The refusal's message, after checking it came early and nothing was started."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert launcher.calls == 0  # no SuperLink, no Ray, no model loaded
    assert seconds < SECONDS
    return err


# ----------------------------------------------------------------- 1-3: held-out data


def test_heldout_path_file_is_evaluated_whole(tmp_path):
    path = write_rows(tmp_path / "heldout.jsonl", 45)
    spec = data.DataSpec(source="files", task="seq-cls", path="/nodes/site-{partition-id}.csv",
                         heldout_path=str(path), test_fraction=0.2, eval_samples=10,
                         num_labels=5)

    assert len(data.heldout(spec)) == 45  # neither test-fraction (9) nor eval-samples (10)


def test_heldout_path_on_a_packaged_corpus_replaces_its_split(tmp_path):
    path = write_rows(tmp_path / "heldout.jsonl", 12)
    spec = data.DataSpec(source="bbc-news", task="seq-cls", heldout_path=str(path))

    assert list(data.heldout(spec)["text"]) == [f"{TEXTS[i % 5]} {i}" for i in range(12)]


def test_a_typo_in_heldout_path_is_an_error_before_flower_starts(tmp_path, launcher, capsys):
    write_rows(tmp_path / "heldout.jsonl", 20)
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={sites(tmp_path)}",
                              "model.num-labels=5",
                              f"data.heldout-path={tmp_path / 'heldout.jsnl'}")

    err = refused(capsys, launcher, rc, seconds)
    assert "heldout.jsnl" in err and "data.heldout-path" in err
    assert "heldout.jsonl" in err  # the file next to it: the typo is visible


def test_server_refuses_a_missing_heldout_path_at_start_up(tmp_path):
    cfg = config.from_flat(tiny_config(**{"data.heldout-path": str(tmp_path / "gone.jsonl")}))

    with pytest.raises(DataError, match=r"gone\.jsonl.*data\.heldout-path"):
        data.heldout(builders.data_spec(cfg))


def serve(tmp_path: Path, flat: dict[str, Any], nodes: list[dict[str, Any]]) -> list[dict]:
    """The real ServerApp ``main`` against the real ClientApp, in process; metrics lines."""
    flat = {**flat, "output-dir": str(tmp_path / "run"), "checkpoint-every": 0}
    grid = InProcessGrid(client_app, nodes, flat)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config=flat))
    return outputs.read_metrics(tmp_path / "run")


def own_files_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return tiny_config(**{"data.source": "files", "data.path": sites(tmp_path, 2, 30),
                          "model.num-labels": 5, "num-server-rounds": 1, **extra})


NODES = [{"partition-id": i, "num-partitions": 2} for i in range(2)]


def test_per_client_files_with_heldout_path_are_evaluated_centrally_and_reload_the_same(
        tmp_path):
    """Items 1, 2 and 11: the template's clients train, the server evaluates the whole
    held-out file, and ``fedlora.load_model`` rebuilds the truncated model to the same
    final metric (the adapter alone would not: the run cut MiniLM to one layer)."""
    import fedlora

    heldout = write_rows(tmp_path / "heldout.jsonl", 45)
    flat = own_files_config(tmp_path, **{"data.heldout-path": str(heldout)})
    records = serve(tmp_path, flat, NODES)

    assert all("eval_accuracy" in r for r in records)
    model, tokenizer = fedlora.load_model(tmp_path / "run")
    info = fedlora.model_info(tmp_path / "run")
    assert (info["num_hidden_layers"], info["num_labels"], info["task"]) == (1, 5, "seq-cls")
    assert len(model.base_model.model.bert.encoder.layer) == 1
    rows = data.load_files(str(heldout), "seq-cls")
    examples = data.tokenize(rows, tokenizer, "seq-cls", info["max_length"])
    assert len(examples) == 45  # evaluated whole
    again = training.evaluate(model, examples, 64, tokenizer.pad_token_id, "seq-cls")
    assert again["eval-accuracy"] == pytest.approx(records[-1]["eval_accuracy"], abs=1e-9)
    assert again["eval-loss"] == pytest.approx(records[-1]["eval_loss"], rel=1e-5)


def test_deployment_job_with_only_node_data_paths_trains_and_evaluates_centrally(tmp_path):
    """docs/deployment.md's job.toml: ``data.source = "files"`` and no ``data.path`` (the
    ServerApp never sees the nodes' configs); each SuperNode names its file and rank in its
    node config, the server evaluates the whole held-out file."""
    heldout = write_rows(tmp_path / "heldout.jsonl", 45)
    flat = tiny_config(**{"data.source": "files", "model.num-labels": 5,
                          "num-server-rounds": 1, "strategy": "flexlora",
                          "data.heldout-path": str(heldout)})
    flat.pop("data.path", None)
    nodes = [{"partition-id": i, "num-partitions": 2, "lora-rank": r,
              "data-path": str(write_rows(tmp_path / f"node-{i}.jsonl", 30))}
             for i, r in enumerate((4, 8))]

    records = serve(tmp_path, flat, nodes)

    assert records[-1]["round"] == 1 and records[-1]["num_accepted"] == 2
    assert all("eval_accuracy" in r for r in records)


def test_a_node_without_any_data_path_says_which_keys_to_set(tmp_path):
    flat = tiny_config(**{"data.source": "files", "model.num-labels": 5})
    flat.pop("data.path", None)
    grid = InProcessGrid(client_app, [{"partition-id": 0, "num-partitions": 1}], flat)

    [reply] = grid.send_and_receive(capability_query(grid))

    error = reply.content["caps"].get(client.DATA_ERROR)
    assert "data.path" in error and "data-path" in error and "neither is set" in error


def test_no_evaluation_with_only_node_data_paths_says_the_nodes_hold_the_files():
    from fedlora.learning.evaluator import no_evaluation_reason

    cfg = config.from_flat(tiny_config(**{"data.source": "files", "model.num-labels": 5}))

    reason = no_evaluation_reason(cfg, server_has_data=False)

    assert "data-path" in reason and "data.heldout-path" in reason
    assert "cannot read data.path ''" not in reason


def test_fedlora_run_with_files_but_no_data_path_is_refused(tmp_path, launcher, capsys):
    rc, seconds = fedlora_run(tmp_path, "data.source=files model.num-labels=5")

    err = refused(capsys, launcher, rc, seconds)
    assert "data.path" in err and "site-{partition-id}.jsonl" in err


def test_no_evaluation_is_said_at_start_up_and_in_every_round_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    records = serve(tmp_path, own_files_config(tmp_path), NODES)

    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no evaluation" in m and "data.heldout-path" in m and "fraction-evaluate" in m
               for m in warned), warned
    assert [r["evaluation"] for r in records] == ["none", "none"]  # round 0 and round 1
    assert all("no evaluation" in run_setup.round_parts(r, 1) for r in records)


def test_no_evaluation_is_warned_before_the_run(tmp_path, launcher, capsys):
    rc, _ = fedlora_run(tmp_path, f"data.source=files data.path={sites(tmp_path)}",
                        "model.num-labels=5")

    assert rc == 0 and launcher.calls == 1
    err = capsys.readouterr().err
    assert "warning: no evaluation" in err and "data.heldout-path" in err


def test_round_line_with_metrics_does_not_say_no_evaluation():
    parts = run_setup.round_parts({"round": 1, "train_loss": 1.0, "eval_accuracy": 0.5}, 3)

    assert "no evaluation" not in parts and "eval_accuracy=0.5000" in parts


# ----------------------------------------------------------------- 4-5: data that is not there


def test_data_path_without_template_for_several_clients_is_refused(tmp_path, launcher,
                                                                    capsys):
    path = write_rows(tmp_path / "site.jsonl", 48)
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={path}",
                              "model.num-labels=5")

    err = refused(capsys, launcher, rc, seconds)
    assert "{partition-id}" in err and "same file" in err and "data.path" in err
    assert "site-{partition-id}.jsonl" in err  # the fix, spelled out


def test_one_client_may_use_a_path_without_template(tmp_path, launcher):
    path = write_rows(tmp_path / "site.jsonl", 48)
    rc, _ = fedlora_run(tmp_path, f"data.source=files data.path={path}", "model.num-labels=5",
                        clients=1)

    assert rc == 0 and launcher.calls == 1


def test_a_missing_site_file_is_named(tmp_path, launcher, capsys):
    template = sites(tmp_path, n=2)  # clients 0 and 1; client 2 has no file
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={template}",
                              "model.num-labels=5")

    err = refused(capsys, launcher, rc, seconds)
    assert "site-2.jsonl" in err and "1 of 3" in err


def test_more_clients_than_the_corpus_can_fill_warns_with_the_numbers():
    cfg = config.from_flat(config.defaults())  # bbc-news: 2,225 articles, 160 per client

    warnings = run_setup.preflight(cfg, 1000)

    text = " ".join(warnings)
    assert "1000 clients" in text and "160" in text and "1,780" in text and "about 1." in text
    assert "at most 11 clients" in text and "data.samples-per-client = 1" in text
    assert not any("clients x" in w for w in run_setup.preflight(cfg, 3))


def test_more_clients_than_training_rows_is_refused():
    cfg = config.from_flat(config.defaults())

    with pytest.raises(FedLoraError, match=r"2000 clients.*1,780 training rows"):
        run_setup.preflight(cfg, 2000)


# ----------------------------------------------------------------- 6: credentials


def test_certs_warns_when_writing_keys_inside_a_git_work_tree(tmp_path, capsys):
    (tmp_path / ".git").mkdir()  # a work tree's marker (git itself is not needed)
    rc = cli.main(["certs", str(tmp_path / "creds"), "--nodes", "1"])

    err = capsys.readouterr().err
    assert rc == 0
    assert "private keys" in err and str(tmp_path) in err and "outside any checkout" in err


def test_certs_outside_a_work_tree_does_not_warn(tmp_path, capsys):
    rc = cli.main(["certs", str(tmp_path / "creds"), "--nodes", "1"])

    assert rc == 0 and "warning" not in capsys.readouterr().err


def test_certs_lists_each_san_once(tmp_path, capsys):
    cli.main(["certs", str(tmp_path / "creds"), "--nodes", "0", "--hosts", "127.0.0.1",
              "localhost", "node.example.org"])

    sans = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("SANs"))
    assert sans.split(None, 1)[1] == "127.0.0.1, localhost, node.example.org"


@pytest.mark.parametrize("path", ["creds/ca.key", "creds/server.pem", "creds/supernode-0.key",
                                  "secrets/signing-1.key"])
def test_gitignore_covers_the_documented_credential_paths(path):
    done = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], check=False)

    assert done.returncode == 0, f"{path} is not ignored by .gitignore"


# ----------------------------------------------------------------- 7-8: labels, columns, keys


def test_labels_out_of_range_are_refused_at_load_with_the_fix(tmp_path):
    path = write_rows(tmp_path / "site-0.jsonl", 30, labels=lambda i: 1 + i % 3)

    with pytest.raises(DataError) as err:
        data.load_files(str(path), "seq-cls", num_labels=3)

    text = str(err.value)
    assert str(path) in text and "[3]" in text and "0..2" in text
    assert "model.num-labels = 3" in text and "subtract 1" in text


def test_labels_beyond_num_labels_suggest_more_labels(tmp_path):
    path = write_rows(tmp_path / "site-0.jsonl", 30, labels=lambda i: i % 6)

    with pytest.raises(DataError, match=r"\[5\].*set model.num-labels = 6"):
        data.load_files(str(path), "seq-cls", num_labels=5)


def test_more_label_names_than_num_labels_is_refused(tmp_path):
    path = tmp_path / "site-0.jsonl"
    path.write_text("".join(json.dumps({"text": "t", "label": name}) + "\n"
                            for name in ["a", "b", "c"]))

    with pytest.raises(DataError, match=r"3 label names.*model.num-labels = 2"):
        data.load_files(str(path), "seq-cls", num_labels=2)


def test_labels_in_range_load(tmp_path):
    path = write_rows(tmp_path / "site-0.jsonl", 30, labels=lambda i: i % 3)

    assert sorted(set(data.load_files(str(path), "seq-cls", num_labels=3)["label"])) == [0, 1, 2]


def test_a_label_out_of_range_is_refused_before_flower_starts(tmp_path, launcher, capsys):
    template = sites(tmp_path, labels=lambda i: 1 + i % 3)
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={template}",
                              "model.num-labels=3")

    err = refused(capsys, launcher, rc, seconds)
    assert "site-0.jsonl" in err and "outside 0..2" in err


def test_a_missing_column_is_refused_before_flower_starts(tmp_path, launcher, capsys):
    template = sites(tmp_path, drop="label")
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={template}",
                              "model.num-labels=5")

    err = refused(capsys, launcher, rc, seconds)
    assert "site-0.jsonl" in err and "'label'" in err and "Rename columns" in err


def test_a_missing_num_labels_is_refused_before_flower_starts(tmp_path, launcher, capsys):
    rc, seconds = fedlora_run(tmp_path, f"data.source=files data.path={sites(tmp_path)}")

    err = refused(capsys, launcher, rc, seconds)
    assert "model.num-labels" in err


def capability_query(grid: InProcessGrid) -> list[Message]:
    msgs = [Message(RecordDict({"q": ConfigRecord({"num-examples": False})}), dst_node_id=n,
                    message_type="query.capabilities") for n in grid.get_node_ids()]
    return msgs


def test_a_node_reports_its_data_error_in_its_capability_answer(tmp_path, caplog):
    good = write_rows(tmp_path / "good.jsonl", 20)
    bad = write_rows(tmp_path / "bad.jsonl", 20, labels=lambda i: 1 + i % 5)
    flat = tiny_config(**{"data.source": "files", "data.path": str(good),
                          "model.num-labels": 5})
    grid = InProcessGrid(client_app, [
        {"partition-id": 0, "num-partitions": 3, "data-path": str(good)},
        {"partition-id": 1, "num-partitions": 3, "data-path": str(bad)},
        {"partition-id": 2, "num-partitions": 3, "data-path": str(tmp_path / "gone.jsonl")}],
        flat)

    replies = grid.send_and_receive(capability_query(grid))
    errors = {int(r.content["caps"]["partition-id"]): r.content["caps"].get(client.DATA_ERROR)
              for r in replies}
    assert errors[0] is None
    assert "bad.jsonl" in errors[1] and "outside 0..4" in errors[1]
    assert "gone.jsonl" in errors[2] and "data-path" in errors[2]

    caplog.set_level(logging.ERROR)
    kept = DataScreenedGrid(grid).send_and_receive(capability_query(grid))
    assert [int(r.content["caps"]["partition-id"]) for r in kept] == [0]
    lines = [r.getMessage() for r in caplog.records if "cannot train" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "partition 1" in lines[0] and "partition 2" in lines[1]


def test_server_names_every_node_when_no_node_can_train(tmp_path):
    flat = tiny_config(**{"data.source": "files", "data.path": sites(tmp_path, 2, 20),
                          "data.heldout-path": str(write_rows(tmp_path / "h.jsonl", 10,
                                                              labels=lambda i: i % 3))})
    flat["model.num-labels"] = 3  # labels 0..4 on every node

    with pytest.raises(DataError, match="no node can train") as err:
        serve(tmp_path, flat, NODES)

    for partition in (0, 1):
        assert f"(partition {partition}): " in str(err.value)
        assert f"site-{partition}.jsonl: label value(s) [3, 4] are outside 0..2" in str(err.value)


# ----------------------------------------------------------------- 9-10: flwr run .


@pytest.mark.parametrize("preset", run_setup.presets())
def test_each_preset_loads_the_way_flwr_run_does(preset):
    """``flwr run . --run-config simulations/configs/<preset>.toml``: Flower parses the file
    (``parse_config_args``) and fuses it with ``[tool.flwr.app.config]``, refusing any key the
    app does not declare (``[code: 15] Invalid run configuration``)."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    overrides = parse_config_args([str(REPO / "simulations" / "configs" / f"{preset}.toml")])
    fused = get_fused_config_from_dir(REPO, overrides)

    cfg = config.from_flat(fused)
    assert cfg.fl.num_clients == overrides["num-clients"]


def test_default_output_dir_is_under_home_not_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    out = outputs.output_dir(config.from_flat(config.defaults()))

    assert out.is_absolute() and out.parent == tmp_path / "home" / "fedlora-runs"


def test_run_lines_do_not_wrap_when_stderr_is_not_a_terminal(capsys):
    line = "fedlora fedit · minilm · 3 clients · 3 rounds · local Ray, 1 CPU / 0 GPU per " \
           "worker → /a/long/output/directory/that/goes/past/eighty/columns"

    run_setup.console().print(line)

    assert capsys.readouterr().err == line + "\n"



# ----------------------------------------------------------------- 11: every preset, for real


@pytest.mark.slow
@pytest.mark.long  # minutes of real launches/training: `make test-long` runs it
@pytest.mark.parametrize("preset", run_setup.presets())
def test_load_model_reproduces_each_presets_final_metric(preset, tmp_path):
    """A real one-round ``fedlora run --preset`` (Flower simulation), then
    ``fedlora.load_model`` on its output: the server's held-out metrics again."""
    import os
    import sys

    import fedlora

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "fedlora", "run", "--preset", preset,
                           "--rounds", "1", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    final = outputs.read_metrics(out)[-1]
    cfg = config.from_flat(json.loads((out / "config.json").read_text()))

    model, tokenizer = fedlora.load_model(out)
    heldout = data.heldout(builders.data_spec(cfg))
    examples = data.tokenize(heldout, tokenizer, cfg.model.task, cfg.data.max_length)
    again = training.evaluate(model, examples, cfg.eval.batch_size, tokenizer.pad_token_id,
                              cfg.model.task)
    assert again["eval-loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
    if cfg.model.task == "seq-cls":
        assert again["eval-accuracy"] == pytest.approx(final["eval_accuracy"], abs=1e-9)
