"""Running a notebook twice gives the same checked values.

The book build executes every chapter once (its executed copies are kept in
``_build/jupyter_execute/chapters``).  This test executes each chapter again, in a fresh
kernel, and compares the two runs cell by cell for

- every *check cell* (a code cell whose source contains ``# Check``): its printed text;
- every value *glued* into the prose (``myst_nb.glue``): its text form.

Cells and glued values that report a timing on purpose are tagged ``timing`` (a cell tag
in the notebook metadata) and excluded: they measure the machine, not the mathematics.
Glued values whose name says they measure the machine (``bench``, ``time``, ``seconds``,
``speed``) are excluded the same way.  Memory addresses (``0x7f...``), durations printed
beside a checked value ("in 3.7 s") and values at rounding level (1e-10 and below, which
depend on the order of multi-threaded sums) are masked, and the two runs are compared as
sets of lines (streams arrive in chunks).

Run after ``make book-strict`` (``make reproducible`` does both).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXECUTED = ROOT / "_build" / "jupyter_execute" / "chapters"
CHAPTERS = sorted(p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
# a duration printed next to a checked value ("300 steps in 3.7 s") measures the machine
# values at rounding level (1e-10 and below) depend on the order of floating-point sums,
# which multi-threaded BLAS does not fix from run to run
_ROUNDING = re.compile(r"\b\d(?:\.\d+)?e-(?:1\d|[2-9]\d|\d{3})\b")
# glued values whose name says they measure the machine (a benchmark, a time)
_MEASURED = re.compile(r"bench|time|seconds|speed|_ms$|_us$")
_DURATION = re.compile(r"\b\d+(?:\.\d+)?(?:e[-+]?\d+)?\s?(?:s|ms|µs|us|ns|seconds?)\b")


def _text(outputs) -> str:
    """All printed text of some outputs, joined (streams arrive in arbitrary chunks)."""
    texts = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            texts.append("".join(out.get("text", "")))
        elif out.get("output_type") in ("execute_result", "display_data"):
            for mime, value in out.get("data", {}).items():
                # a glued value's text is stored under a papermill prefix until the build
                if mime.removeprefix("application/papermill.record/") == "text/plain":
                    texts.append("".join(value))
    text = _DURATION.sub("<duration>", _ADDRESS.sub("0x…", "".join(texts)))
    text = _ROUNDING.sub("<rounding>", text)
    # compare the set of lines: streams arrive in chunks, and the build's executed copy
    # can repeat a chunk when it merges streams
    return "\n".join(sorted({line.rstrip() for line in text.splitlines() if line.strip()}))


def _is_timing(cell) -> bool:
    return "timing" in cell.get("metadata", {}).get("tags", [])


def _check_cells(nb) -> dict[str, str]:
    """Printed text of every check cell, by cell index."""
    return {f"cell {i}": _text([o for o in cell.get("outputs", [])  # glue: compared by name
                                if not o.get("metadata", {}).get("scrapbook")])
            for i, cell in enumerate(nb["cells"])
            if cell["cell_type"] == "code" and not _is_timing(cell)
            and "# Check" in "".join(cell["source"])}


def _glued(nb) -> tuple[dict[str, str], set[str]]:
    """Glued values by name, and the names glued by timing cells."""
    values, timing = {}, set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            name = (out.get("metadata", {}).get("scrapbook") or {}).get("name")
            if name:
                if _is_timing(cell):
                    timing.add(name)
                values[name] = _text([out])
    return values, timing


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_second_run_gives_the_same_checked_values(chapter, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    first_path = EXECUTED / chapter
    if not first_path.exists():
        message = (f"no executed copy of {chapter} under {EXECUTED}: run `python tasks.py "
                   f"reproducible` (it builds the book first; chapters outside _toc.yml are "
                   f"not built)")
        if os.environ.get("BOOK_BUILT") == "required":
            pytest.fail(message)
        pytest.skip(message)
    first = json.loads(first_path.read_text(encoding="utf-8"))
    glue_path = first_path.with_suffix(".glue.json")  # the build keeps glued values apart
    first_glue = ({name: _text([out]) for name, out in
                   json.loads(glue_path.read_text(encoding="utf-8")).items()}
                  if glue_path.exists() else {})
    second = nbformat.read(ROOT / "chapters" / chapter, as_version=4)
    nbclient.NotebookClient(second, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(ROOT / "chapters")}}).execute()
    second = json.loads(nbformat.writes(second))
    a, b = _check_cells(first), _check_cells(second)
    second_glue, timing = _glued(second)
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    assert set(first_glue) == set(second_glue), (sorted(first_glue), sorted(second_glue))
    assert a, f"{chapter} has no check cells to compare"
    differ = [f"{key}:\n  first:  {a[key]}\n  second: {b[key]}" for key in a if a[key] != b[key]]
    differ += [f"glued {name!r}: first {first_glue[name]}, second {second_glue[name]}"
               for name in first_glue if name not in timing and not _MEASURED.search(name)
               and first_glue[name] != second_glue[name]]
    assert not differ, f"{chapter}: the second run differs\n" + "\n".join(differ)
