"""Helpers for the chapters' notebooks that must work outside the book build too.

* :func:`glue` quotes a computed value in the prose.  In the book build (and wherever
  ``myst_nb`` is installed) it is ``myst_nb.glue``; elsewhere, on Colab say, it shows the
  value when asked to and otherwise does nothing, so a chapter runs without ``myst_nb``.
* :func:`skip_rest_unless` lets a chapter whose subject is an optional part (the
  pretrained model of chapter 18) say once what to install, instead of failing in
  every cell.
"""

from __future__ import annotations

from typing import Any

try:
    from myst_nb import glue as _myst_glue
except ImportError:  # not installed (Colab, or only `pip install attnlib[torch]`)
    _myst_glue = None

HAVE_MYST_NB = _myst_glue is not None


def glue(name: str, variable: Any, display: bool = True) -> None:
    """Store ``variable`` under ``name`` for ``{glue:text}`name``` in the prose.

    Without ``myst_nb`` nothing is stored; the value is displayed if ``display``.  A NumPy
    or torch scalar is stored as the Python number it holds, so that a format such as
    ``:.2f`` applies to it (myst_nb cannot format ``np.float64(0.5)``).
    """
    variable = _plain_number(variable)
    if _myst_glue is not None:
        _myst_glue(name, variable, display=display)
    elif display:
        from IPython.display import display as show

        show(variable)


def _plain_number(value: Any) -> Any:
    """NumPy scalars, 0-d arrays and one-element torch tensors -> int/float/bool."""
    item = getattr(value, "item", None)
    shape = getattr(value, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == () and type(value).__module__ \
            .split(".")[0] in ("numpy", "torch"):
        return item()
    return value


def skip_rest_unless(available: bool, reason: str) -> bool:
    """If not ``available``, every later cell of the running notebook prints ``reason``
    and runs nothing else.  Returns ``available``.

    Uses an IPython input transformer, so it acts only inside IPython (a notebook); in a
    plain Python process it raises ``RuntimeError`` with the reason when not available.
    """
    if available:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        get_ipython = None
    shell = get_ipython() if get_ipython is not None else None
    if shell is None:
        raise RuntimeError(reason)
    message = f"skipped: {reason}"

    def replace_cell(lines: list[str]) -> list[str]:
        return [f"print({message!r})\n"]

    shell.input_transformers_cleanup.append(replace_cell)
    print(message + "\n(every later cell of this chapter prints this instead of running)")
    return False
