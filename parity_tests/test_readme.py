"""Every Python snippet in README.md runs as written."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("torch", reason="the snippets use both frameworks")
pytest.importorskip("flax", reason="the snippets use both frameworks")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
with open(README) as _f:
    SNIPPETS = re.findall(r"```python\n(.*?)```", _f.read(), re.S)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
