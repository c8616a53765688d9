"""Back-matter directives that read the chapters, so the indexes never drift from them.

``{chapter-exercises}``   a list, per chapter, of links to its exercises
``{chapter-references}``  a list, per chapter, of the papers it cites with {footcite}

Both scan the notebooks listed in ``_toc.yml`` (in book order) for the markup the
chapters use: ```{exercise}`` blocks with a ``:label:``, and ``{footcite}`key` `` roles.
The output is MyST markdown parsed in place, so the links are ordinary cross-references
checked by the ``-W -n`` build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

_EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n(?::[a-z-]+:[^\n]*\n)*?:label:\s*(\S+)")
_CITE = re.compile(r"\{footcite(?::[a-z]+)?\}`([^`]+)`")


def _chapters(app) -> list[tuple[str, str, str]]:
    """(docname, title, markdown text) of every notebook chapter, in toc order."""
    root = Path(app.srcdir)
    found = []
    for docname in _toc_order(app):
        path = root / f"{docname}.ipynb"
        if not path.exists():
            continue
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")),
                     docname)
        found.append((docname, title, text))
    return found


def _toc_order(app) -> list[str]:
    toc = app.env.external_site_map  # set by sphinx-external-toc
    return list(toc) if toc is not None else sorted(app.env.found_docs)


class _ChapterList(SphinxDirective):
    has_content = False

    def items(self, text: str) -> list[str]:
        raise NotImplementedError

    def run(self):
        lines = []
        for docname, title, text in _chapters(self.env.app):
            self.env.note_dependency(str(Path(self.env.srcdir) / f"{docname}.ipynb"))
            items = self.items(text)
            if items:
                number = Path(docname).name.split("_")[0].lstrip("0")
                label = f"Chapter {number}. {title}" if number.isdigit() else title
                lines += [f"**{{doc}}`{label} </{docname}>`**", ""] + items + [""]
        container = self.parse_markdown(lines)
        return container

    def parse_markdown(self, lines):
        from docutils import nodes
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="chapter-index"), self.content_offset, node)
        return node.children


class ChapterExercises(_ChapterList):
    def items(self, text):
        return [f"- {{ref}}`{label}`" for label in _EXERCISE.findall(text)]


class ChapterReferences(_ChapterList):
    def items(self, text):
        keys = []
        for group in _CITE.findall(text):
            keys += [k.strip() for k in group.split(",") if k.strip() not in keys]
        keys = list(dict.fromkeys(keys))
        return [f"- {{cite:t}}`{key}`" for key in keys]


def setup(app):
    app.add_directive("chapter-exercises", ChapterExercises)
    app.add_directive("chapter-references", ChapterReferences)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
