"""Every command line the documentation shows is one its script accepts.

The README, docs/ and the scripts' own docstrings show `python -m scripts.X ...` lines. A flag that
was renamed, a preset that moved, or a choice that was dropped leaves such a line failing as
written while every test that builds its own argv still passes. Here each documented line is
collected (fenced blocks, inline code, module docstrings; backslash continuations joined; comments,
pipes and `&&` cut off) and handed to its script's own ``main``, which parses it with its real parser;
the parse is where the check stops (nothing trains or downloads). Running the commands end to end is
done for the ones a CPU can afford by test_cli_bad_input.py and test_generate_script.py.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(glob.glob("docs/*.in.md", root_dir=ROOT)), "docs/architecture.md"]
MODULES = sorted(glob.glob("scripts/*.py", root_dir=ROOT))
COMMAND = re.compile(r"python3? -m (scripts\.\w+|twin_parity\.pitfalls)\b(.*)")


def _chunks(path: str) -> list[str]:
    """The code a file shows a reader: Markdown's fenced blocks and inline spans, a module's docstring."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".py"):
        return [ast.get_docstring(ast.parse(text)) or ""]
    fenced = re.findall(r"```[\w-]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return fenced + [span.replace("\n", " ") for span in inline]  # a span wrapped over two lines is one line


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argv) of every documented command line."""
    found = []
    for path in DOCS + MODULES:
        for chunk in _chunks(path):
            for line in re.sub(r"\\+\n\s*", " ", chunk).splitlines():
                m = COMMAND.search(" ".join(line.split()))
                if m is None:
                    continue
                args = re.split(r"\s#|&&|\|\||\||;", m.group(2))[0]
                if re.search(r"\[--|\.\.\.|<\w+>", args):  # a synopsis ("[--json PATH]"), not a command
                    continue
                found.append((path, m.group(1), shlex.split(args)))
    return found


COMMANDS = documented_commands()


def test_the_documentation_shows_commands_of_every_kind():
    """The collector finds what it is meant to (a regex that matches nothing would pass every case)."""
    modules = {module for _, module, _ in COMMANDS}
    assert {"scripts.train", "scripts.generate", "scripts.export", "scripts.parity_report",
            "scripts.bench_train", "scripts.bench_generate"} <= modules, modules  # fmt: skip
    assert len(COMMANDS) >= 40, len(COMMANDS)


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("where,module,argv", COMMANDS, ids=[f"{w}:{m} {' '.join(a)}" for w, m, a in COMMANDS])
def test_a_documented_command_parses(where, module, argv, monkeypatch, capsys):
    honest = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(honest(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = importlib.import_module(module if module != "twin_parity.pitfalls" else module + ".__main__").main
    try:
        main(argv)
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{where} documents `python -m {module} {shlex.join(argv)}`, which its parser refuses "
                    f"(exit {e.code}): {capsys.readouterr().err.strip()}")  # fmt: skip
    pytest.fail(f"{module}.main returned without parsing its arguments")
