"""Build docs/guide.md from docs/guide.in.md: code excerpts come from the real source, the pitfall
table from running the checks in twin_parity/pitfalls/.

    python -m scripts.build_guide            # regenerate everything, measurements included
    python -m scripts.build_guide --check    # exit 1 if any code excerpt or the prose is stale
    python -m scripts.build_guide --check --measure  # also re-measure, exit 1 if a measured cell moved
    python -m scripts.build_guide --code-only  # refresh the excerpts, keep the measurements

Directives in the template (HTML comments, so the template renders too):
    <!-- twin: block.CausalSelfAttention.__init__ -->   the object from torch_impl/block.py and
                                                         jax_impl/block.py, side by side
    <!-- code: twin_common.config:BlockConfig -->        one object from one module
    <!-- pitfalls -->                                    the measured pitfall table
    <!-- pitfalls: llama -->                             the same for twin_parity/pitfalls/llama.py
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


TOKEN = re.compile(r"[A-Za-z_][\w.]*|\S")


def _code_tokens(src: str) -> list[str]:
    """The code tokens of ``src``: comments and docstring lines left out."""
    lines = [line.split("#")[0] for line in src.splitlines() if not line.strip().startswith(('"""', "r\"\"\""))]
    return [t for line in lines for t in TOKEN.findall(line)]


def _join(tokens: list[str]) -> str:
    """Tokens back to code: a space only between two words (``super().__init__()``, ``rngs=rngs``)."""
    out = ""
    for t in tokens:
        out += (" " if out and (out[-1].isalnum() or out[-1] in "_,") and (t[0].isalnum() or t[0] == "_") else "") + t
    return out


# Names each framework gives the same thing, which no spelling similarity can find.
SAME_IDEA = {("forward", "__call__"), ("torch.Tensor", "jax.Array"), ("weight", "kernel"),
             ("torch.no_grad", "jax.lax.stop_gradient"), ("state_dict", "nnx.state")}  # fmt: skip


def same_idea(left: str, right: str) -> bool:
    """Whether a replaced token run reads as one thing renamed (``nn.Module`` → ``nnx.Module``,
    ``eps`` → ``epsilon``, ``forward`` → ``__call__``), not two unrelated lines the aligner paired
    (``betas`` → ``dtype``): spelled alike (difflib ratio >= 0.6), or a known pair of names."""
    return (left, right) in SAME_IDEA or difflib.SequenceMatcher(None, left, right).ratio() >= 0.6


def diff_summary(torch_src: str, jax_src: str, most: int = 4) -> str:
    """One line: how many lines differ, and the first few differing code tokens, e.g.
    "3 of 9 lines differ: `nn.Module` → `nnx.Module`, ..." (+ only in Flax, − only in torch).
    A replacement is named only where both sides are the same idea (``same_idea``)."""
    a, b = torch_src.splitlines(), jax_src.splitlines()
    same = sum(m.size for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    ta, tb = _code_tokens(torch_src), _code_tokens(jax_src)
    pairs = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        left, right = _join(ta[i1:i2]), _join(tb[j1:j2])
        if op != "equal" and len(left) <= 24 and len(right) <= 24 and (left, right) not in pairs:
            if any(c.isalnum() for c in left + right) and (op != "replace" or same_idea(left, right)):
                pairs.append((left, right))
    change = lambda a, b: f"`{a}` → `{b}`" if a and b else f"+`{b}` (Flax)" if b else f"−`{a}` (torch)"  # noqa: E731
    shown = ", ".join(change(left, right) for left, right in pairs[:most])
    more = f", and {len(pairs) - most} more" if len(pairs) > most else ""
    head = f"{max(len(a), len(b)) - same} of {max(len(a), len(b))} lines differ"
    return f"{head}: {shown}{more}" if shown else head


def render_twin(name: str) -> str:
    """``module.Object`` from both packages; ``torch_name / jax_name`` where the names must differ
    (torch's ``forward`` is NNX's ``__call__``).

    The two excerpts are stacked, PyTorch first, under a one-line summary of what differs: side by
    side they needed 1550-1870 px, and a code host shows about 900 (test_guide.py measures it)."""
    torch_name, _, jax_name = (part.strip() for part in name.partition(" / "))
    module, torch_dotted = torch_name.split(".", 1)
    jax_dotted = jax_name.split(".", 1)[1] if jax_name else torch_dotted
    torch_src, torch_link = excerpt(f"torch_impl.{module}", torch_dotted)
    jax_src, jax_link = excerpt(f"jax_impl.{module}", jax_dotted)
    return (
        f"_{diff_summary(torch_src, jax_src)}_\n\n"
        f"**PyTorch** ([`torch_impl/{module}.py`]({torch_link})):\n\n```python\n{torch_src}\n```\n\n"
        f"**Flax NNX** ([`jax_impl/{module}.py`]({jax_link})):\n\n```python\n{jax_src}\n```"
    )


def render_code(spec: str) -> str:
    module, dotted = spec.split(":")
    src, link = excerpt(module, dotted)
    return f"[`{module.replace('.', '/')}.py`]({link}):\n\n```python\n{src}\n```"


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    return "0" if value == 0 else f"{value:.2e}"


def render_pitfalls(family: str = "") -> str:
    """The measured list of ``twin_parity.pitfalls`` (or of its module ``family``, e.g. "llama")."""
    module = importlib.import_module("twin_parity.pitfalls" + (f".{family}" if family else ""))
    measure_all = module.measure_all
    # One list item per pitfall, not a six-column table: the table needed 1118 px, a page has ~900.
    items = []
    for p, m in measure_all():
        items.append(
            f"- **{p.title}** <a id=\"{p.id}\"></a>: {p.differs} *Pinned:* {p.pinned_by} "
            f"*Measured* ({m.quantity}): ignored **{_fmt(m.ignored)}**, pinned **{_fmt(m.pinned)}**."
        )
    return "\n".join(item.replace("\n", " ") for item in items)


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
            body = render_pitfalls(arg) if kind == "pitfalls" else render_built_on()
        else:
            body = old.get(key, "(not measured yet: run python -m scripts.build_guide)")
        out.append(f"<!-- BEGIN {key} -->\n{body}\n<!-- END {key} -->")
    return "\n".join(out).rstrip() + "\n"


MEASURED = ("pitfalls", "built-on")  # blocks whose numbers depend on the machine that measured them


def is_measured(key: str) -> bool:
    """``pitfalls``, ``pitfalls: llama``, ``built-on``: a measured block, by its directive."""
    return key.split(":")[0] in MEASURED


def stale_measured(committed: str, fresh: str) -> list[str]:
    """Measured blocks whose text differs between ``committed`` and a fresh measurement, line by line."""
    a, b = _existing_blocks(committed), _existing_blocks(fresh)
    problems = []
    for name in [k for k in {**a, **b} if is_measured(k)]:
        old, new = a.get(name, "").splitlines(), b.get(name, "").splitlines()
        for n in range(max(len(old), len(new))):
            x, y = (old[n] if n < len(old) else ""), (new[n] if n < len(new) else "")
            if x != y:
                item = re.search(r'id="([^"]+)"', x + y)
                problems.append(f"{name}: {item.group(1) if item else f'line {n + 1}'} differs")
    return problems


def stale_sections(committed: str, fresh: str) -> list[str]:
    a, b = _existing_blocks(committed), _existing_blocks(fresh)
    names = [k for k in b if not is_measured(k)]
    problems = [f"{k}: missing from docs/guide.md" for k in names if k not in a]
    problems += [f"{k}: differs from the source" for k in names if k in a and a[k] != b[k]]
    if not problems and committed != fresh:
        problems.append("the prose differs from docs/guide.in.md")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify docs/guide.md is current; write nothing")
    parser.add_argument("--measure", action="store_true",
                        help="with --check: re-measure the pitfall cells too and compare them (takes minutes)")
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
        if args.measure:
            problems += stale_measured(previous, build(measure=True, previous=previous))
        if problems:
            print("docs/guide.md is out of date (run python -m scripts.build_guide):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
            diff = difflib.unified_diff(previous.splitlines(), fresh.splitlines(), "committed", "fresh", lineterm="", n=1)
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            return 1
        if args.measure:
            print("docs/guide.md is current: code excerpts, prose and measured cells")
        else:
            print("docs/guide.md: code excerpts and prose are current; the measured cells (pitfall figures, "
                  "built-on line) were not re-measured. They depend on the CPU that measured them; "
                  "--check --measure compares them on this machine")
        return 0
    text = build(measure=not args.code_only, previous=previous)
    from twin_common.files import write_atomic

    write_atomic(OUTPUT, text.encode())
    print(f"wrote {os.path.relpath(OUTPUT, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
