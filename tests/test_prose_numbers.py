"""No computed number is typed into a chapter's prose.

Every number a chapter computes or measures reaches its prose through `glue` (see
CONTRIBUTING.md), so the text cannot drift from the output.  This test reads the markdown
cells of every chapter and the captions and alt text of its figures and flags what looks
like a result typed in by hand: a decimal number (0.82), a percentage (37 %) or a
multiplier (2.9x, 3×), outside math, code, glue roles and citations.  A sentence that
cites a paper (``{footcite}``) may quote the paper's figures.  A value that is a definition
rather than a result can be written in math (``$\\tau = 0.5$``) or listed in ALLOWED.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))

SUSPECT = re.compile(
    r"(?<![\w.\-/])(?:"
    r"\d+\.\d+(?!\w|\.\d)"              # a decimal: 0.82, 1.9 (also before a full stop)
    r"|\d+(?:\.\d+)?\s?%"               # a percentage: 37 %, 1.7%
    r"|\d+(?:\.\d+)?\s?[x×](?![\w])"    # a multiplier: 2.9x, 3×
    r")")
_REMOVE = [
    re.compile(r"```.*?```", re.S),                       # fenced code
    re.compile(r"\$\$.*?\$\$", re.S),                     # display math
    re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.S),  # amsmath environments
    re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$"),            # inline math
    re.compile(r"\{[\w:-]+\}`[^`]*`"),                    # roles: glue, ref, numref, doc ...
    re.compile(r"`[^`\n]*`"),                             # inline code
    re.compile(r"\]\([^)]*\)"),                           # link targets
    re.compile(r"https?://\S+"),                          # bare URLs
    re.compile(r"<!--.*?-->", re.S),                      # HTML comments
]
_SENTENCE = re.compile(r"(?<=[.!?:])\s+(?=[A-Z(*_])|\n\s*\n|\n\s*[-*] ")

# (chapter number, exact text) pairs that are definitions, not results; keep it short.
ALLOWED: set[tuple[str, str]] = set()


def _strip(text: str) -> str:
    for pattern in _REMOVE:
        text = pattern.sub(" ", text)
    return text


def _suspects(text: str) -> list[str]:
    found = []
    for sentence in _SENTENCE.split(text):
        if "{footcite" in sentence or "{cite" in sentence:
            continue
        found += [m.group(0) for m in SUSPECT.finditer(_strip(sentence))]
    return found


def _places(path: Path):
    """(where, text) for every markdown cell and every figure caption and alt text."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            yield f"markdown cell {i}", "".join(cell["source"])
        mystnb = cell.get("metadata", {}).get("mystnb", {})
        for key, field in (("figure", "caption"), ("image", "alt")):
            text = mystnb.get(key, {}).get(field)
            if text:
                yield f"cell {i} {field}", text


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_no_typed_in_results(chapter):
    problems = []
    for where, text in _places(chapter):
        for value in _suspects(text):
            if (chapter.name[:2], value) not in ALLOWED:
                context = re.search(rf".{{0,50}}{re.escape(value)}.{{0,30}}", text.replace("\n", " "))
                problems.append(f"{where}: {value!r} in ...{context.group(0) if context else ''}...")
    assert not problems, (f"{chapter.name}: numbers typed into the prose; glue them from the "
                          f"cell that computes them (CONTRIBUTING.md):\n  " + "\n  ".join(problems))


def test_the_check_catches_typed_numbers_and_spares_glued_ones():
    assert _suspects("The loop is 2.9x slower and wastes 37 % of memory.") == ["2.9x", "37 %"]
    assert _suspects("Accuracy is {glue:text}`ch10_acc:.3f` at $\\tau = 0.5$, in `f(0.1)`.") == []
    assert _suspects("FlashAttention-2 reaches 50-73 % of peak {footcite}`dao2023`.") == []
    assert _suspects("Chapter 3 uses d_k = 64 and 12 heads.") == []
    assert _suspects("The weight stays near 0.1. Then it grows.") == ["0.1"]
