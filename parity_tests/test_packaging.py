"""What a newcomer meets before any model runs: the declared Python and torch versions, the licence,
the ignored run folders, text meant for users only, and a converter that needs neither trainer."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import tomllib

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "pyproject.toml"), "rb") as _f:
    PROJECT = tomllib.load(_f)["project"]


def _installed_requires_python(name: str) -> SpecifierSet | None:
    try:
        spec = importlib.metadata.metadata(name).get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        return None
    return SpecifierSet(spec) if spec else None


def _lowest_python(spec: SpecifierSet) -> Version:
    """The lowest 3.x minor release the specifier admits."""
    return next(Version(f"3.{minor}") for minor in range(6, 30) if Version(f"3.{minor}") in spec)


@pytest.mark.parametrize("dependency", ["jax", "jaxlib", "flax", "optax", "numpy", "torch"])
def test_requires_python_is_what_the_dependencies_need(dependency):
    """requires-python ">=3.10" let pip try Python 3.10, where jax 0.10 and flax 0.12.8 (>=3.11) do
    not install: minutes of backtracking, then a failure."""
    needed = _installed_requires_python(dependency)
    if needed is None:
        pytest.skip(f"{dependency} is not installed or declares no Requires-Python")
    ours = _lowest_python(SpecifierSet(PROJECT["requires-python"]))
    assert ours in needed, f"requires-python admits {ours}, but {dependency} needs {needed}"


def test_the_installed_torch_is_in_the_declared_range():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    declared = next(d for d in PROJECT["dependencies"] if re.match(r"torch\b", d))
    release = Version(Version(torch.__version__).base_version)  # 2.14.1+cu130 -> 2.14.1
    assert release in SpecifierSet(declared.removeprefix("torch")), f"torch {release} vs {declared}"


def test_licence_file_matches_the_declared_licence():
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    with open(os.path.join(REPO, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.splitlines()


def test_run_folders_are_ignored():
    _tracked_files()  # skips outside a git checkout
    proc = subprocess.run(["git", "check-ignore", "-q", "runs/compare/log.jsonl"], cwd=REPO)
    assert proc.returncode == 0, "runs/ (what scripts.train writes by default) is not git-ignored"


# Text written for the people building the project, not for its users.
TEAM_ONLY = re.compile(r"ANCHORS\.md|\.\./shared/|\bissue \d|\bthis\s+session\b|\bthe team\b", re.I)


def test_no_team_only_text_in_the_product():
    hits = []
    for path in _tracked_files():
        if path == "parity_tests/test_packaging.py" or path.endswith((".png", ".safetensors")):
            continue
        with open(os.path.join(REPO, path), encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if TEAM_ONLY.search(line):
                    hits.append(f"{path}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


GENERIC = {"scripts", "parity_tests", "tests", "test", "utils", "common", "src", "examples", "docs"}


def test_the_wheel_installs_no_generic_top_level_names():
    """A wheel that installs a top-level "scripts" or "parity_tests" collides with other projects'
    in one environment; the command lines install as twin_scripts (from the scripts/ folder)."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    folders = setuptools.get("package-dir", {})
    top = {name.split(".")[0] for name in setuptools["packages"]}
    assert not top & GENERIC, f"installed under generic names: {sorted(top & GENERIC)}"
    for name in setuptools["packages"]:
        first, _, rest = name.partition(".")
        folder = os.path.join(REPO, folders.get(first, first), *rest.split(".") if rest else [])
        assert os.path.exists(os.path.join(folder, "__init__.py")), f"package {name}: no {folder}/__init__.py"
    for command, target in PROJECT["scripts"].items():
        module = target.split(":")[0]
        first, _, rest = module.partition(".")
        assert first in top, f"{command} runs {module}, which the wheel does not install"
        assert os.path.exists(os.path.join(REPO, folders.get(first, first), rest + ".py")), f"{command}: no {module}"


def test_the_command_lines_import_each_other_relatively():
    """Installed as twin_scripts, ``from scripts.x import`` would fail: scripts/ imports itself with
    ``from .x import``."""
    folder = os.path.join(REPO, "scripts")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    modules = [node.module or ""]
                assert not [m for m in modules if m.split(".")[0] == "scripts"], f"scripts/{name}: {modules}"
