"""The teaching guide (docs/guide.md) must match the source it quotes and list every pitfall."""

from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("torch", reason="the guide quotes both frameworks")
pytest.importorskip("flax", reason="the guide quotes both frameworks")

from scripts import build_guide as bg  # noqa: E402


def _committed() -> str:
    with open(bg.OUTPUT) as f:
        return f.read()


def test_every_code_excerpt_matches_the_source():
    committed = _committed()
    problems = bg.stale_sections(committed, bg.build(measure=False, previous=committed))
    assert not problems, "docs/guide.md is stale; run python -m scripts.build_guide:\n" + "\n".join(problems)


def test_the_check_notices_a_changed_source(monkeypatch):
    """If a quoted function changes, the check above fails (here: a changed eps line)."""
    committed = _committed()
    real = bg.excerpt

    def edited(module, dotted):
        src, link = real(module, dotted)
        return (src.replace("epsilon=cfg.ln_eps", "epsilon=1e-6"), link)

    monkeypatch.setattr(bg, "excerpt", edited)
    problems = bg.stale_sections(committed, bg.build(measure=False, previous=committed))
    assert any("layer_norm" in p for p in problems), problems


def test_every_pitfall_has_a_measured_row():
    from parity_tests.pitfalls import PITFALLS

    committed = _committed()
    table = re.search(r"<!-- BEGIN pitfalls -->\n(.*?)\n<!-- END pitfalls -->", committed, re.S)
    assert table, "the guide has no pitfall table"
    rows = table.group(1).splitlines()[2:]
    assert len(rows) == len(PITFALLS)
    for pitfall, row in zip(PITFALLS, rows):
        assert f'id="{pitfall.id}"' in row, f"row for {pitfall.id} missing or out of order"
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[3] and cells[4], f"{pitfall.id}: no measured values"


def test_links_in_the_guide_point_at_files_that_exist():
    committed = _committed()
    docs = os.path.dirname(bg.OUTPUT)
    for target in set(re.findall(r'href="([^"#]+)', committed)) | set(re.findall(r"\]\(([^)#]+)", committed)):
        if target.startswith("http"):
            continue
        assert os.path.exists(os.path.join(docs, target)), f"broken link {target}"
