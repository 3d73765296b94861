"""Build docs/guide.md from docs/guide.in.md: code excerpts come from the real source, the pitfall
table from running the checks in parity_tests/pitfalls.py.

    python -m scripts.build_guide            # regenerate everything, measurements included
    python -m scripts.build_guide --check    # exit 1 if any code excerpt in docs/guide.md is stale
    python -m scripts.build_guide --code-only  # refresh the excerpts, keep the measurements

Directives in the template (HTML comments, so the template renders too):
    <!-- twin: block.CausalSelfAttention.__init__ -->   the object from torch_impl/block.py and
                                                         jax_impl/block.py, side by side
    <!-- code: twin_common.config:BlockConfig -->        one object from one module
    <!-- pitfalls -->                                    the measured pitfall table
    <!-- built-on -->                                    machine and versions of the last full build
Generated text sits between <!-- BEGIN ... --> and <!-- END ... --> markers in the output.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import platform
import re
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(REPO, "docs", "guide.in.md")
OUTPUT = os.path.join(REPO, "docs", "guide.md")
DIRECTIVE = re.compile(r"^<!-- (twin|code|pitfalls|built-on)(?::\s*(.*?))? -->$")


def _resolve(module_name: str, dotted: str):
    obj = importlib.import_module(module_name)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)


def excerpt(module_name: str, dotted: str) -> tuple[str, str]:
    """(source of the object, link 'path#Lstart-Lend' relative to docs/)."""
    obj = _resolve(module_name, dotted)
    lines, start = inspect.getsourcelines(obj)
    path = os.path.relpath(inspect.getsourcefile(obj), REPO)
    source = textwrap.dedent("".join(lines)).rstrip()
    return source, f"../{path}#L{start}-L{start + len(lines) - 1}"


def render_twin(name: str) -> str:
    """``module.Object`` from both packages; ``torch_name / jax_name`` where the names must differ
    (torch's ``forward`` is NNX's ``__call__``)."""
    torch_name, _, jax_name = (part.strip() for part in name.partition(" / "))
    module, torch_dotted = torch_name.split(".", 1)
    jax_dotted = jax_name.split(".", 1)[1] if jax_name else torch_dotted
    torch_src, torch_link = excerpt(f"torch_impl.{module}", torch_dotted)
    jax_src, jax_link = excerpt(f"jax_impl.{module}", jax_dotted)
    return (
        "<table><tr>"
        f'<th><a href="{torch_link}">PyTorch: torch_impl/{module}.py</a></th>'
        f'<th><a href="{jax_link}">Flax NNX: jax_impl/{module}.py</a></th></tr>\n<tr><td>\n\n'
        f"```python\n{torch_src}\n```\n\n</td><td>\n\n```python\n{jax_src}\n```\n\n</td></tr></table>"
    )


def render_code(spec: str) -> str:
    module, dotted = spec.split(":")
    src, link = excerpt(module, dotted)
    return f"[`{module.replace('.', '/')}.py`]({link}):\n\n```python\n{src}\n```"


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    return "0" if value == 0 else f"{value:.2e}"


def render_pitfalls() -> str:
    from parity_tests.pitfalls import measure_all

    rows = ["| pitfall | what differs | how this project pins it | ignored | pinned | measured |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for p, m in measure_all():
        cells = [f"**{p.title}** <a id=\"{p.id}\"></a>", p.differs, p.pinned_by, _fmt(m.ignored), _fmt(m.pinned), m.quantity]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def render_built_on() -> str:
    import flax
    import jax
    import torch

    return (
        f"_Measured by `python -m scripts.build_guide` on {platform.machine()} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), flax {flax.__version__}._"
    )


def _existing_blocks(text: str) -> dict[str, str]:
    found = {}
    for m in re.finditer(r"<!-- BEGIN (.+?) -->\n(.*?)\n<!-- END \1 -->", text, re.S):
        found[m.group(1)] = m.group(2)
    return found


def build(measure: bool, previous: str = "") -> str:
    """The guide's text. Without ``measure``, the pitfall table and build line are taken from
    ``previous`` (so a check needs no measurements)."""
    old = _existing_blocks(previous)
    out = []
    with open(TEMPLATE) as f:
        template = f.read()
    for line in template.splitlines():
        m = DIRECTIVE.match(line.strip())
        if not m:
            out.append(line)
            continue
        kind, arg = m.group(1), (m.group(2) or "").strip()
        key = f"{kind}: {arg}" if arg else kind
        if kind == "twin":
            body = render_twin(arg)
        elif kind == "code":
            body = render_code(arg)
        elif measure:
            body = render_pitfalls() if kind == "pitfalls" else render_built_on()
        else:
            body = old.get(key, "(not measured yet: run python -m scripts.build_guide)")
        out.append(f"<!-- BEGIN {key} -->\n{body}\n<!-- END {key} -->")
    return "\n".join(out).rstrip() + "\n"


def stale_sections(committed: str, fresh: str) -> list[str]:
    a, b = _existing_blocks(committed), _existing_blocks(fresh)
    names = [k for k in b if k not in ("pitfalls", "built-on")]
    problems = [f"{k}: missing from docs/guide.md" for k in names if k not in a]
    problems += [f"{k}: differs from the source" for k in names if k in a and a[k] != b[k]]
    if not problems and committed != fresh:
        problems.append("the prose differs from docs/guide.in.md")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify docs/guide.md is current; write nothing")
    parser.add_argument("--code-only", action="store_true",
                        help="refresh the code excerpts, keep the last measurements (no checks run)")
    args = parser.parse_args(argv)
    previous = ""
    if os.path.exists(OUTPUT):
        with open(OUTPUT) as f:
            previous = f.read()
    if args.check:
        fresh = build(measure=False, previous=previous)
        problems = stale_sections(previous, fresh)
        if problems:
            print("docs/guide.md is out of date (run python -m scripts.build_guide):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            diff = difflib.unified_diff(previous.splitlines(), fresh.splitlines(), "committed", "fresh", lineterm="", n=1)
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            return 1
        print("docs/guide.md is current")
        return 0
    text = build(measure=not args.code_only, previous=previous)
    from weight_conversion.safetensors_io import write_atomic

    write_atomic(OUTPUT, text.encode())
    print(f"wrote {os.path.relpath(OUTPUT, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
