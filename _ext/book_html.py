"""Small fixes to the HTML that Jupyter Book 1 writes, found by tests/browser.

- sphinx-thebe and sphinx-togglebutton register their inline scripts twice, so every
  page raised "Identifier 'THEBE_JS_URL' has already been declared"; keep each once.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files", [])
    seen, unique = set(), []
    for script in scripts:
        # the copies differ only in filename None vs "" (both mean an inline script)
        key = (getattr(script, "filename", None) or "",
               str(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    # in place: the list is the builder's own, and handlers that run later (MathJax)
    # append to it
    scripts[:] = unique


def setup(app):
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
