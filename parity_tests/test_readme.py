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


def _anchor(heading: str) -> str:
    """The anchor a code host gives a Markdown heading: lower case, punctuation dropped, spaces
    to hyphens ("16. Sharded: one split column" -> "16-sharded-one-split-column")."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_into_the_docs_land_on_their_section():
    """Every README link to a doc's #anchor names a heading that exists there, and a link that says
    "section N" lands on the heading numbered N (sections get renumbered as the guide grows)."""
    root = os.path.dirname(README)
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    links = re.findall(r"\[([^\]]*)\]\(((?:docs/)[\w./-]+\.md)(?:#([\w-]+))?\)", readme)
    assert any(doc == "docs/guide.md" for _, doc, _ in links)
    for text, doc, anchor in links:
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            headings = re.findall(r"^#+ (.+)$", f.read(), re.M)
        if anchor:
            assert anchor in {_anchor(h) for h in headings}, f"README links {doc}#{anchor}: no such heading"
        number = re.search(r"section (\d+)", text)
        if number:
            assert anchor and anchor.startswith(number.group(1) + "-"), (
                f"README's link {text!r} -> {doc}#{anchor} does not land on section {number.group(1)}")
