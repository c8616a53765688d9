#!/usr/bin/env python3
"""The book's task runner: the same commands on Linux, macOS and Windows.

    python tasks.py book        set up .venv (the reader's install) and build the book
    python tasks.py test        set up .venv (everything) and run every test

On Linux and macOS `make book` and `make test` run exactly these.  Other tasks:

    python tasks.py unit                    the unit tests of attnlib
    python tasks.py notebooks [--chapters 01-06]
                                            every chapter under nbval (check cells assert)
    python tasks.py book-strict             the book build with warnings as errors
    python tasks.py browser                 every page of the built book in headless Chromium
    python tasks.py reproducible            every chapter a second time, compared with the build
    python tasks.py minimal                 every chapter with only `pip install .[torch]`
                                            (as on Colab: no myst_nb, Triton, transformers)
    python tasks.py resolve [--quick]       do the requirements resolve for users on every
                                            platform? (needs the package index)
    python tasks.py lock                    rewrite constraints.txt from .venv
    python tasks.py repo-url [URL]          show, or change, the repository URL everywhere

Options for every task that installs: `--torch-index cpu` (or the environment variable
TORCH_INDEX=cpu) takes PyTorch from PyTorch's CPU-only wheel index, about 200 MB instead
of about 2.7 GB of CUDA wheels on Linux.  PYTHON chooses the interpreter for `make`.
Only the standard library is used here, so it runs before any install.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
MINIMAL_VENV = ROOT / ".venv-minimal"
WINDOWS = os.name == "nt"
TORCH_INDEXES = {"cpu": "https://download.pytorch.org/whl/cpu"}
# What each flavour installs: requirement files, and attnlib's extras (pyproject.toml).
FLAVOURS = {
    "book": (["requirements.txt"], "torch"),
    "test": (["requirements-test.txt"], "torch,kernels,pretrained"),
}
# Extras a chapter's Colab set-up cell installs (the others need "torch").
CHAPTER_EXTRAS = {"16": "torch,kernels", "17": "torch,kernels", "18": "torch,pretrained"}


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(*cmd, env: dict | None = None, cwd: Path = ROOT) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        sys.exit(f"tasks.py: command failed with exit status {result.returncode}: "
                 + " ".join(str(c) for c in cmd))


def tool(venv: Path, name: str) -> Path:
    """A program installed in a virtual environment (bin/ or Scripts\\ on Windows)."""
    folder = venv / ("Scripts" if WINDOWS else "bin")
    return folder / (name + (".exe" if WINDOWS else ""))


def python(venv: Path = VENV) -> Path:
    return tool(venv, "python")


# -- set-up ---------------------------------------------------------------------------

def _fingerprint(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files + ["constraints.txt", "pyproject.toml"]:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _requirement_files(name: str) -> list[str]:
    """A requirements file and the files it includes with `-r`."""
    files = [name]
    for line in (ROOT / name).read_text().splitlines():
        if line.startswith("-r "):
            files += _requirement_files(line[3:].split("#")[0].strip())
    return files


def _create_venv(venv: Path) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"tasks.py: Python >= 3.11 is needed, this is {sys.version.split()[0]} "
                 "(choose another with PYTHON=python3.12 make ..., or py -3.12 tasks.py ...)")
    if not python(venv).exists():
        say(f"creating the virtual environment {venv.name}")
        run(sys.executable, "-m", "venv", venv)
        run(python(venv), "-m", "pip", "install", "--upgrade", "pip")


def _install_torch(venv: Path, torch_index: str | None) -> None:
    if torch_index:
        url = TORCH_INDEXES.get(torch_index, torch_index)
        say(f"installing PyTorch from {url}")
        run(python(venv), "-m", "pip", "install", "-c", ROOT / "constraints.txt", "torch",
            "--index-url", url)
    elif sys.platform.startswith("linux"):
        print("Note: on Linux PyTorch's default wheels bring about 2.7 GB of CUDA libraries. "
              "For the CPU-only build (about 200 MB) use `--torch-index cpu` "
              "(or TORCH_INDEX=cpu make ...).", flush=True)


def setup(flavour: str = "book", torch_index: str | None = None) -> None:
    """Create .venv and install a flavour, unless it is installed and unchanged."""
    files, extras = FLAVOURS[flavour]
    stamp = VENV / ".installed.json"
    done = json.loads(stamp.read_text()) if stamp.exists() else {}
    wanted = {"test": ["test"], "book": ["book", "test"]}[flavour]  # test includes book
    if any(done.get(f) == _fingerprint(_requirement_files(FLAVOURS[f][0][0])) for f in wanted):
        return
    _create_venv(VENV)
    _install_torch(VENV, torch_index or os.environ.get("TORCH_INDEX"))
    say(f"installing the {flavour} flavour into {VENV.name} (progress below)")
    cmd = [python(), "-m", "pip", "install", "-c", ROOT / "constraints.txt"]
    for f in files:
        cmd += ["-r", ROOT / f]
    run(*cmd, "-e", f".[{extras}]")
    run(python(), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    done[flavour] = _fingerprint(_requirement_files(files[0]))
    stamp.write_text(json.dumps(done, indent=1))


def offline_env() -> dict[str, str]:
    """Notebook kernels run tests/offline's start-up file: any network connection fails."""
    return {"IPYTHONDIR": str(ROOT / "tests" / "offline"), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


# -- tasks ----------------------------------------------------------------------------

def task_book(args) -> None:
    setup("book", args.torch_index)
    run(tool(VENV, "jupyter-book"), "build", ".")
    print(f"\nThe book is at {ROOT / '_build' / 'html' / 'index.html'} (open it in a browser).")


def task_unit(args) -> None:
    setup("test", args.torch_index)
    run(python(), "-m", "pytest", "tests", "--ignore=tests/browser",
        "--ignore=tests/reproducible")


def chapter_paths(spec: str | None) -> list[str]:
    """'01-06' or '03,05' -> the notebook paths; None -> the chapters folder."""
    if not spec:
        return ["chapters"]
    numbers = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        numbers |= set(range(int(lo), int(hi or lo) + 1))
    paths = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")
                   if int(p.name[:2]) in numbers)
    if not paths:
        sys.exit(f"tasks.py: no chapter matches --chapters {spec!r}")
    return paths


def task_notebooks(args) -> None:
    setup("test", args.torch_index)
    run(python(), "-m", "pytest", "-p", "no:cacheprovider", "--nbval-lax",
        "--nbval-current-env", "-n", str(args.jobs), "--dist", "loadscope",
        *chapter_paths(args.chapters), env=offline_env())


def task_book_strict(args) -> None:
    setup("test", args.torch_index)
    shutil.rmtree(ROOT / "_build", ignore_errors=True)
    run(tool(VENV, "jupyter-book"), "build", ".", "-W", "-n", "--keep-going", env=offline_env())


def _have_browser() -> bool:
    return bool(os.environ.get("CHROMIUM_PATH") or any(
        shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")))


def task_browser(args) -> None:
    setup("test", args.torch_index)
    if os.environ.get("CI") and not _have_browser() and shutil.which("apt-get"):
        say("CI: installing Debian's chromium for the browser test")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "chromium"], **quiet).returncode:
            subprocess.run(sudo + ["apt-get", "update", "-q"], **quiet)
            run(*sudo, "apt-get", "install", "-y", "-q", "chromium")
    if not (ROOT / "_build" / "html" / "chapters" / "index.html").exists():
        task_book_strict(args)
    run(python(), "-m", "pytest", "-p", "no:cacheprovider", "tests/browser",
        env={"BOOK_BUILT": "required"})
    print(f"Screenshots: {ROOT / 'test-artifacts' / 'screenshots'}")


def task_reproducible(args) -> None:
    setup("test", args.torch_index)
    if not (ROOT / "_build" / "jupyter_execute" / "chapters").is_dir():
        task_book_strict(args)
    run(python(), "-m", "pytest", "-p", "no:cacheprovider", "-n", str(args.jobs),
        "tests/reproducible", env={**offline_env(), "BOOK_BUILT": "required"})


def task_minimal(args) -> None:
    """Every chapter in a venv that has only `pip install .[torch]` (Colab's situation)."""
    stamp = MINIMAL_VENV / ".installed.json"
    if not stamp.exists() or stamp.read_text() != _fingerprint([]):
        shutil.rmtree(MINIMAL_VENV, ignore_errors=True)
        _create_venv(MINIMAL_VENV)
        _install_torch(MINIMAL_VENV, args.torch_index or os.environ.get("TORCH_INDEX"))
        say(f"installing only attnlib[torch] (and a notebook runner) into {MINIMAL_VENV.name}")
        run(python(MINIMAL_VENV), "-m", "pip", "install", "-c", ROOT / "constraints.txt",
            ".[torch]", "nbclient", "ipykernel")
        stamp.write_text(_fingerprint([]))
    # the working tree's attnlib comes first, so an edit since the install is what runs
    run(python(MINIMAL_VENV), ROOT / "tests" / "minimal" / "run_chapters.py",
        *chapter_paths(args.chapters), env={**offline_env(), "PYTHONPATH": str(ROOT)})


def task_resolve(args) -> None:
    setup("test", args.torch_index)  # the check runs pip from .venv (needs `packaging`)
    run(python(), ROOT / "tests" / "install" / "resolve.py", *(["--quick"] if args.quick else []))


def task_test(args) -> None:
    start = time.time()
    for step in (task_resolve, task_unit, task_notebooks, task_book_strict, task_browser,
                 task_reproducible, task_minimal):
        say(f"{step.__name__.removeprefix('task_').replace('_', '-')} "
            f"({time.time() - start:.0f} s so far)")
        step(args)
    print(f"\nAll tests passed in {time.time() - start:.0f} s: the requirements resolve on "
          "every platform, the unit tests, every notebook (nbval), the book build with -W, "
          "the pages in a browser, a second run of every notebook, and every notebook with "
          "only attnlib[torch] installed.")


def task_lock(args) -> None:
    """constraints.txt from the packages installed in .venv (the versions tested)."""
    frozen = subprocess.run([python(), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    header = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line.startswith("#")]
    pins = []
    for line in frozen:
        name, sep, version = line.partition("==")
        if sep and name.lower() not in ("attnlib", "triton", "pip", "setuptools"):
            pins.append(f"{name}=={version.split('+')[0]}")  # 2.13.0+cpu -> 2.13.0
    (ROOT / "constraints.txt").write_text("\n".join(header + pins) + "\n")
    print(f"constraints.txt: {len(pins)} pinned packages")


# -- the repository URL: one setting (`repository.url` in _config.yml) ----------------

_URL_LINE = re.compile(r"^(repository:\s*\n(?:[ \t]+.*\n)*?[ \t]+url:[ \t]*)(\S+)", re.M)


def repository_url() -> str:
    match = _URL_LINE.search((ROOT / "_config.yml").read_text(encoding="utf-8"))
    if not match:
        sys.exit("tasks.py: _config.yml has no repository: url: setting")
    return match.group(2).rstrip("/")


def setup_cell_source(url: str, extras: str) -> str:
    """The Colab set-up cell of a chapter, installing attnlib with the extras it needs."""
    return (
        "# On Google Colab, install attnlib (and what this chapter needs) first; anywhere\n"
        "# else this cell does nothing.  (`python tasks.py repo-url` writes this URL.)\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install",\n'
        f'                    "attnlib[{extras}] @ git+{url}.git"], check=True)')


def chapter_extras(notebook: Path) -> str:
    return CHAPTER_EXTRAS.get(notebook.name[:2], "torch")


def sync_repository_url(url: str) -> list[str]:
    """Write `url` into _config.yml, pyproject.toml, the README, the front matter and every
    chapter's Colab set-up cell; return the files changed."""
    changed = []
    old = repository_url()

    def rewrite(path: Path, text: str) -> None:
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(str(path.relative_to(ROOT)))

    for name in ("_config.yml", "pyproject.toml", "README.md", "chapters/front/how_to_run.md"):
        path = ROOT / name
        text = path.read_text(encoding="utf-8").replace(old, url)
        old_pages, new_pages = _pages_url(old), _pages_url(url)
        rewrite(path, text.replace(old_pages, new_pages) if old_pages and new_pages else text)
    for notebook in sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        cells = [c for c in nb["cells"] if "colab-setup" in c.get("metadata", {}).get("tags", [])]
        if len(cells) != 1:
            sys.exit(f"tasks.py: {notebook.name} must have exactly one cell tagged colab-setup")
        source = setup_cell_source(url, chapter_extras(notebook))
        if "".join(cells[0]["source"]) != source:
            cells[0]["source"] = source.splitlines(keepends=True)
            rewrite(notebook, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return changed


def _pages_url(url: str) -> str | None:
    """https://github.com/owner/repo -> https://owner.github.io/repo"""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+)", url)
    return f"https://{match.group(1)}.github.io/{match.group(2)}" if match else None


def task_repo_url(args) -> None:
    url = (args.url or repository_url()).rstrip("/").removesuffix(".git")
    changed = sync_repository_url(url)
    print(f"repository URL: {url}")
    print("changed: " + (", ".join(changed) if changed else "nothing (all files agree)"))


# -- command line ---------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The book's tasks (see the top of tasks.py).")
    parser.add_argument("task", choices=["book", "test", "unit", "notebooks", "book-strict",
                                         "browser", "reproducible", "minimal", "resolve",
                                         "lock", "repo-url"])
    parser.add_argument("url", nargs="?", help="repo-url: the new repository URL")
    parser.add_argument("--torch-index", help="'cpu' or an index URL to take PyTorch from")
    parser.add_argument("--chapters", help="notebooks/minimal: e.g. 01-06 or 03,05")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", 2)),
                        help="pytest-xdist workers for the notebooks (default 2)")
    parser.add_argument("--quick", action="store_true", help="resolve: one Python version")
    args = parser.parse_args(argv)
    globals()["task_" + args.task.replace("-", "_")](args)


if __name__ == "__main__":
    main()
