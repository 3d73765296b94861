"""The teaching guide (docs/guide.md) must match the source it quotes and list every pitfall."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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


@pytest.mark.parametrize("family", ["", "llama"])
def test_every_pitfall_has_a_measured_row(family):
    from twin_parity import pitfalls
    from twin_parity.pitfalls import llama

    PITFALLS = llama.LLAMA_PITFALLS if family else pitfalls.PITFALLS  # noqa: N806
    key = "pitfalls" + (f": {family}" if family else "")
    committed = _committed()
    section = re.search(rf"<!-- BEGIN {key} -->\n(.*?)\n<!-- END {key} -->", committed, re.S)
    assert section, "the guide has no pitfall list"
    items = section.group(1).splitlines()
    assert len(items) == len(PITFALLS)
    for pitfall, item in zip(PITFALLS, items):
        assert f'id="{pitfall.id}"' in item, f"entry for {pitfall.id} missing or out of order"
        measured = re.search(r"ignored \*\*(.+?)\*\*, pinned \*\*(.+?)\*\*\.$", item)
        assert measured and all(measured.groups()), f"{pitfall.id}: no measured values"


def test_links_in_the_guide_point_at_files_that_exist():
    committed = _committed()
    docs = os.path.dirname(bg.OUTPUT)
    for target in set(re.findall(r'href="([^"#]+)', committed)) | set(re.findall(r"\]\(([^)#]+)", committed)):
        if target.startswith("http"):
            continue
        assert os.path.exists(os.path.join(docs, target)), f"broken link {target}"


# ------------------------------------------------------------------------------- rendered width

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
PAGE_WIDTH = 900  # px: a code host's file view on a laptop-sized window
# The rules of GitHub's markdown stylesheet that decide widths: a padded column, code blocks that
# scroll inside themselves at 85% of 16 px monospace, tables as scrolling blocks no wider than the
# column. Anything over the column is hidden behind a scroll bar, as the side-by-side tables were.
# The column holds 97 characters of code, the source's line limit is 100: a code block may run up to
# 3 characters (about 25 px) past it; a table may not.
PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; }}
.markdown-body {{ box-sizing: border-box; width: {width}px; padding: 32px; font: 16px/1.5 sans-serif; }}
pre {{ padding: 16px; overflow: auto; font-size: 85%; line-height: 1.45; }}
code, pre {{ font-family: monospace; }}
table {{ display: block; width: max-content; max-width: 100%; overflow: auto; border-collapse: collapse; }}
td, th {{ padding: 6px 13px; border: 1px solid #ccc; }}
</style></head><body><article class="markdown-body">{body}</article>
<pre id="measured"></pre><script>
const probe = document.createElement("pre");
probe.style.cssText = "position: absolute; visibility: hidden; padding: 0";
probe.textContent = "x".repeat(100);
document.querySelector("article").appendChild(probe);
const slack = 3 * probe.getBoundingClientRect().width / 100;  // SLACK_CHARS characters of code
const over = [];
for (const el of document.querySelectorAll("article pre, article table")) {{
  if (el !== probe && el.scrollWidth > el.clientWidth + (el.tagName === "PRE" ? slack : 1))
    over.push({{tag: el.tagName, text: el.innerText.split("\\n")[0].slice(0, 60),
               scroll: el.scrollWidth, client: el.clientWidth}});
}}
document.getElementById("measured").textContent = JSON.stringify(
  {{page: document.documentElement.scrollWidth, slack, blocks: document.querySelectorAll("article pre").length, over}});
</script></body></html>"""


def render_in_chromium(markdown_text: str, tmp_path, screenshot: str | None = None) -> dict:
    """Render ``markdown_text`` as a code host would at PAGE_WIDTH in headless chromium and return
    the widths measured in the page (and write a PNG screenshot if asked)."""
    import html
    import json

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_text)
    page = tmp_path / "guide.html"
    page.write_text(PAGE.format(width=PAGE_WIDTH, body=body), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={PAGE_WIDTH},1400"]  # fmt: skip
    run = lambda *extra: subprocess.run([CHROMIUM, *flags, *extra, page.as_uri()],  # noqa: E731
                                        capture_output=True, text=True, timeout=120)  # fmt: skip
    dom = run("--dump-dom").stdout
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found and found.group(1), f"chromium did not render the page: {dom[:300]!r}"
    if screenshot:
        run(f"--screenshot={screenshot}")
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_guide_fits_a_900px_page(tmp_path):
    """Every table of docs/guide.md fits the column, and every code block (up to 3 characters)."""
    pytest.importorskip("markdown_it", reason="markdown-it-py renders the Markdown")
    measured = render_in_chromium(_committed(), tmp_path, os.environ.get("GUIDE_SCREENSHOT"))
    assert measured["blocks"] >= 20, measured  # the excerpts really rendered as code blocks
    assert measured["page"] <= PAGE_WIDTH, measured
    assert not measured["over"], "wider than the page:\n" + "\n".join(map(str, measured["over"]))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_width_check_sees_a_side_by_side_table(tmp_path):
    """The check above measures: two excerpts side by side in one table overflow the column."""
    pytest.importorskip("markdown_it", reason="markdown-it-py renders the Markdown")
    src, _ = bg.excerpt("torch_impl.block", "MLP")
    side_by_side = f"<table><tr><td>\n\n```python\n{src}\n```\n\n</td><td>\n\n```python\n{src}\n```\n\n</td></tr></table>"
    over = render_in_chromium(side_by_side, tmp_path)["over"]
    assert [o["tag"] for o in over] == ["TABLE"], over


def test_check_says_what_it_did_not_compare(capsys):
    """--check compares excerpts and prose; it must not call the machine-dependent figures current."""
    if bg.stale_sections(_committed(), bg.build(measure=False, previous=_committed())):
        pytest.skip("the guide is stale (test_every_code_excerpt_matches_the_source says where)")
    assert bg.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "measured cells" in out and "not re-measured" in out and "is current" not in out


def test_check_measure_names_a_moved_figure():
    committed = _committed()
    section = re.search(r"<!-- BEGIN pitfalls -->\n(.*?)\n<!-- END pitfalls -->", committed, re.S).group(1)
    first = section.splitlines()[0]
    moved = re.sub(r"pinned \*\*(.+?)\*\*", "pinned **9.99e-01**", first)
    fresh = committed.replace(first, moved)
    problems = bg.stale_measured(committed, fresh)
    assert len(problems) == 1 and problems[0].startswith("pitfalls: ") and problems[0].endswith(" differs")
    assert not bg.stale_measured(committed, committed)


def test_diff_summary_names_a_replacement_only_where_both_sides_are_one_idea():
    """The line above each twin pair names renamed things (``nn.Module`` → ``nnx.Module``,
    ``forward`` → ``__call__``), never two unrelated tokens the aligner happened to pair."""
    from scripts.build_guide import diff_summary

    torch_src = "class A(nn.Module):\n    def forward(self, x):\n        betas = (0.9, 0.95)\n        return (x)\n"
    jax_src = "class A(nnx.Module):\n    def __call__(self, x):\n        dtype = (0.9, 0.95)\n        return x\n"
    line = diff_summary(torch_src, jax_src)
    assert "`nn.Module` → `nnx.Module`" in line and "`forward` → `__call__`" in line, line
    assert "betas" not in line and "dtype" not in line, line  # unrelated: counted, not named
    assert "`)`" not in line and "`(`" not in line, line  # punctuation alone is not named
    assert line.startswith("4 of 4 lines differ"), line
