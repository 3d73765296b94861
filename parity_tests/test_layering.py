"""The rooms of the project and what each may import (docs/architecture.md), checked by reading every
import statement with ``ast`` (nothing is imported): no room imports a room above it, the two twins
never import each other, nothing imports a test file or conftest.py, and no two modules import each
other, directly or around a longer loop. Imports inside functions count: a lazy import is an import."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Each room and the rooms it may import (itself included). Lowest first.
ALLOWED = {
    "twin_common": {"twin_common"},
    "weight_conversion": {"twin_common", "weight_conversion"},
    "torch_impl": {"twin_common", "weight_conversion", "torch_impl"},
    "jax_impl": {"twin_common", "weight_conversion", "jax_impl"},
    "twin_parity": {"twin_common", "weight_conversion", "torch_impl", "jax_impl", "twin_parity"},
    "scripts": {"twin_common", "weight_conversion", "torch_impl", "jax_impl", "twin_parity", "scripts"},
    "parity_tests": {"twin_common", "weight_conversion", "torch_impl", "jax_impl", "twin_parity", "scripts",
                     "parity_tests"},
}  # fmt: skip


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file in the rooms under ``root``."""
    found = {}
    for room in ALLOWED:
        for path in sorted((root / room).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(name: str, path: Path, tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports: ``from a import b`` names the module a.b when that is a
    file, the package a otherwise."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c where only a.b is a file of ours
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imported(name, path, ast.parse(path.read_text(), str(path)), modules)
            for name, path in modules.items()}  # fmt: skip


def _is_test_file(module: str) -> bool:
    last = module.rpartition(".")[2]
    return module.startswith("parity_tests.") and (last.startswith("test_") or last == "conftest")


def layering_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        room = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] not in ALLOWED[room]:
                problems.append(f"upward arrow: {module} imports {target}")
            elif _is_test_file(target):
                problems.append(f"{module} imports the test file {target}")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def test_every_room_imports_only_the_rooms_below_it():
    problems = layering_problems(import_graph(REPO))
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    found = circles(import_graph(REPO))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(group) for group in found)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for room in ALLOWED:
        (root / room).mkdir(exist_ok=True)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        # the training CLI's glue in the floor: twin_common.mesh importing both sharded twins
        ({"twin_common/mesh.py": "def setup():\n    from torch_impl.sharding import init_distributed\n",
          "torch_impl/sharding.py": "from twin_common.mesh import AXES\n"},
         "upward arrow: twin_common.mesh imports torch_impl.sharding"),
        # the converter reading the model from a twin
        ({"weight_conversion/layout.py": "import jax_impl.gpt\n", "jax_impl/gpt.py": ""},
         "upward arrow: weight_conversion.layout imports jax_impl.gpt"),
        # one twin importing the other
        ({"jax_impl/train.py": "from torch_impl.train import Trainer\n", "torch_impl/train.py": ""},
         "upward arrow: jax_impl.train imports torch_impl.train"),
        # a script importing the proof library from the test folder
        ({"scripts/bench_train.py": "from parity_tests.sharded_helpers import replica_groups\n",
          "parity_tests/sharded_helpers.py": ""},
         "upward arrow: scripts.bench_train imports parity_tests.sharded_helpers"),
        # a test importing conftest.py, and one test importing another
        ({"parity_tests/test_a.py": "from parity_tests.conftest import HAVE_JAX\n", "parity_tests/conftest.py": ""},
         "parity_tests.test_a imports the test file parity_tests.conftest"),
        ({"parity_tests/test_a.py": "from parity_tests import test_b\n", "parity_tests/test_b.py": ""},
         "parity_tests.test_a imports the test file parity_tests.test_b"),
    ],
)  # fmt: skip
def test_the_check_finds_each_kind_of_upward_arrow(tmp_path, files, expected):
    assert expected in layering_problems(import_graph(_tree(tmp_path, files)))


def test_the_check_finds_a_circle_through_a_lazy_import(tmp_path):
    """gpt.py's generate imported generate.py's loop inside the function; generate.py imports GPT."""
    root = _tree(tmp_path, {
        "torch_impl/__init__.py": "",
        "torch_impl/gpt.py": "def generate():\n    from torch_impl.generate import run\n",
        "torch_impl/generate.py": "from torch_impl.gpt import GPT\n",
        "twin_common/__init__.py": "from twin_common.config import GPTConfig\n",
        "twin_common/config.py": "",
        "twin_common/checks.py": "from twin_common import GPTConfig\n",
    })  # fmt: skip
    assert circles(import_graph(root)) == [["torch_impl.generate", "torch_impl.gpt"]]


def test_the_rooms_are_the_packages_on_disk():
    """A new top-level package must be given a room (and a place in docs/architecture.md)."""
    on_disk = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert on_disk == set(ALLOWED), f"rooms {sorted(ALLOWED)}, packages on disk {sorted(on_disk)}"
    assert os.path.exists(REPO / "docs" / "architecture.md")


@pytest.mark.parametrize("script", ["trainers", "bench_train", "bench_generate", "bench_io"])
def test_a_model_name_means_one_model_in_every_script(script):
    """"small" and "gpt2" once meant three different models across four scripts."""
    import importlib

    from twin_common.presets import PRESETS

    offered = importlib.import_module(f"scripts.{script}").MODELS
    for name, value in offered.items():
        cfg = value[0] if isinstance(value, tuple) else value  # bench_train: (config, batch)
        assert cfg == PRESETS[name], f"scripts.{script} --model {name} is not the preset {name}"
