"""The docs site and the README tell the truth: generated pages match the code, the site builds
strictly, and every shell command in them either runs here or is marked as one that cannot.

Every ```bash block of README.md and docs/*.md is preceded by a marker line the tests read:

* ``<!-- commands: run -->``: runs offline in under a minute; :func:`test_doc_commands_run`
  executes each of its lines (in a fresh directory, ``fedlora`` = this checkout's CLI);
* ``<!-- commands: long -->``: trains or simulates (over a minute on 2 cores);
* ``<!-- commands: deployment -->``: needs other machines, GPUs or processes left running.

``docs/add-*.md`` (other branches' notes, spliced into the pages at merge) are not checked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- commands: (run|long|deployment) -->$")
FENCE = re.compile(r"^```(bash|sh|console|shell)\s*$")
COMMAND_TIMEOUT_S = 60


def _pages() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("add-"))
    return [ROOT / "README.md", *docs]


def shell_blocks(text: str) -> list[tuple[int, str | None, list[str]]]:
    """``(line number, marker or None, command lines)`` of every shell block in ``text``;
    continuation lines (ending in ``\\``) are joined, comments and blank lines dropped."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            previous = lines[i - 1] if i else ""
            marker = MARKER.match(previous)
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            commands, pending = [], ""
            for line in body:
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                command = (pending + line).strip()
                pending = ""
                if command and not command.startswith("#"):
                    commands.append(command)
            blocks.append((i, marker.group(1) if marker else None, commands))
        i += 1
    return blocks


def _run_commands() -> list[tuple[str, str]]:
    return [(f"{page.relative_to(ROOT)}:{line}", command)
            for page in _pages()
            for line, marker, commands in shell_blocks(page.read_text())
            if marker == "run" for command in commands]


def test_shell_blocks_are_read_with_their_markers():
    # Prepare
    text = ("<!-- commands: run -->\n```bash\nfedlora config  # keys\n# a comment\n```\n\n"
            "```bash\nfedlora run \\\n    --rounds 2\n```\n")

    # Execute
    blocks = shell_blocks(text)

    # Assert
    assert [(marker, commands) for _, marker, commands in blocks] == [
        ("run", ["fedlora config  # keys"]), (None, ["fedlora run      --rounds 2"])]


def test_every_shell_block_says_whether_a_test_runs_it():
    unmarked = [f"{page.relative_to(ROOT)}:{line}" for page in _pages()
                for line, marker, _ in shell_blocks(page.read_text()) if marker is None]
    assert not unmarked, (
        f"shell blocks without a marker: {unmarked}; put <!-- commands: run --> (offline, under "
        f"a minute: the tests run it), <!-- commands: long --> or <!-- commands: deployment --> "
        f"on the line before the ```bash")


def test_some_doc_commands_are_run():
    assert len(_run_commands()) >= 4  # the listing commands and `fedlora certs` at least


@pytest.mark.parametrize(("where", "command"), _run_commands())
def test_doc_commands_run(where, command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}
    # `fedlora` is this checkout's CLI, whatever is installed on PATH
    prelude = f'fedlora() {{ {shlex.quote(sys.executable)} -m fedlora "$@"; }}\n'
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", prelude + command],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-2000:]}"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["configuration.md", "rules.md"])
def test_generated_page_equals_the_generators_output(page):
    generator = _generator()
    assert (ROOT / "docs" / page).read_text() == generator.PAGES[page](), (
        f"docs/{page} is stale; run `python3 docs/generate.py`")


def test_configuration_page_lists_every_key_of_fedlora_config():
    from fedlora import config

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert [key for key in config.schema() if f"| `{key}` |" not in page] == []


def test_rules_page_has_a_section_per_registered_rule():
    from fedlora.aggregation import available_strategies

    page = (ROOT / "docs" / "rules.md").read_text()
    assert re.findall(r"^## `([\w-]+)`$", page, re.M) == list(available_strategies())


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]')")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "rules" / "index.html").exists()


def test_a_fast_test_cannot_start_a_superlink_or_supernode():
    from fedlora.runtime.launcher import RunFailed, console_script, refuse_in_fast_tests

    assert os.environ.get("FEDLORA_FAST_TEST", "").endswith(
        "test_a_fast_test_cannot_start_a_superlink_or_supernode")
    for server in ("flower-superlink", "flower-supernode"):
        with pytest.raises(RunFailed, match="not marked slow"):
            refuse_in_fast_tests([console_script(server), "--insecure"])
    refuse_in_fast_tests([console_script("flwr"), "run"])  # the CLI of a SuperLink is allowed


def test_a_fast_test_gets_a_clear_error_from_fedlora_run(tmp_path, capsys):
    from fedlora.cli import main as cli

    rc = cli.main(["run", "--rounds", "1", "--num-clients", "2", "--out", str(tmp_path / "o")])

    assert rc != 0 and "is not marked slow" in capsys.readouterr().err
