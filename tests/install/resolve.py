"""Do the requirements resolve for real users, on every platform the README names?

Resolves, against the public package index with no local wheels and no pip
configuration, what each install flavour asks for (requirements files, attnlib's
extras from pyproject.toml, constraints.txt), for Linux x86-64 and aarch64, macOS arm64
and Windows, on each supported Python version.  `pip install --dry-run --report`
with `--platform` / `--python-version` does the resolution without installing.

pip evaluates environment markers against the machine it runs on, not the target
platform (PyTorch's `nvidia-*; platform_system == "Linux"` would be asked for on
Windows too), so pip runs here with its marker environment replaced by the target's
(see `_PIP_FOR_TARGET`).  Prints a table of the download size of each
flavour (from the report's URLs and the index's file sizes).

    python tests/install/resolve.py            # every flavour x platform x Python
    python tests/install/resolve.py --quick    # one Python version per platform

Exits 0 when all resolve, 1 when one does not, and 0 with a message when the index
cannot be reached (the check needs the network; the book itself never does).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
INDEX = "https://pypi.org/simple"
# the oldest release of each Python the README names (3.11.5: soupsieve of the lock needs it)
PYTHONS = ["3.11.5", "3.12.0", "3.13.0"]

# pip's --platform tags for each target, newest first, and the marker environment
# that our own requirements are evaluated in.
# (glibc 2.28 or newer, as PyTorch's Linux wheels need)
_MANYLINUX = [f"manylinux_2_{minor}" for minor in range(28, 4, -1)] + [
    "manylinux2014", "manylinux2010", "manylinux1"]
PLATFORMS = {
    "linux-x86_64": ([f"{t}_x86_64" for t in _MANYLINUX] + ["linux_x86_64"],
                     {"sys_platform": "linux", "platform_system": "Linux",
                      "platform_machine": "x86_64", "os_name": "posix"}),
    "linux-aarch64": ([f"{t}_aarch64" for t in _MANYLINUX] + ["linux_aarch64"],
                      {"sys_platform": "linux", "platform_system": "Linux",
                       "platform_machine": "aarch64", "os_name": "posix"}),
    "macos-arm64": (["macosx_14_0_arm64"],
                    {"sys_platform": "darwin", "platform_system": "Darwin",
                     "platform_machine": "arm64", "os_name": "posix"}),
    "windows-amd64": (["win_amd64"],
                      {"sys_platform": "win32", "platform_system": "Windows",
                       "platform_machine": "AMD64", "os_name": "nt"}),
}
# install flavour -> (requirements files, attnlib extras)
FLAVOURS = {
    "reader": ([], ["torch"]),
    "book": (["requirements.txt"], ["torch"]),
    "kernels": ([], ["torch", "kernels"]),
    "pretrained": ([], ["torch", "pretrained"]),
    "test": (["requirements-test.txt"], ["torch", "kernels", "pretrained"]),
}


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a requirements file, following `-r` includes."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            lines += read_requirements(path.parent / line[3:].strip())
        else:
            lines.append(line)
    return lines


def attnlib_requirements(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


# Runs pip with packaging's default marker environment replaced by the target's, so that
# markers (ours and those of every dependency) are evaluated for the target platform.
_PIP_FOR_TARGET = """
import json, sys
from pip._vendor.packaging import markers
target = json.loads(sys.argv.pop(1))
host = markers.default_environment
markers.default_environment = lambda: {**host(), **target}
from pip._internal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def marker_environment(env: dict[str, str], python: str) -> dict[str, str]:
    full = python if python.count(".") == 2 else python + ".0"
    return {**env, "python_version": ".".join(full.split(".")[:2]), "python_full_version": full,
            "implementation_version": full, "implementation_name": "cpython",
            "platform_python_implementation": "CPython"}


def for_target(requirements: list[str], env: dict[str, str], python: str) -> list[str]:
    """The requirements that apply on the target, with their markers evaluated away."""
    out = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None:
            if not req.marker.evaluate(marker_environment(env, python)):
                continue
            req.marker = None
        out.append(str(req))
    return out


def index_reachable() -> bool:
    try:
        urllib.request.urlopen(f"{INDEX}/pip/", timeout=15).close()
        return True
    except OSError:
        return False


def file_sizes(names: set[str]) -> dict[str, int]:
    """Size in bytes of each distribution file, from the index's JSON (PEP 691)."""
    sizes = {}
    projects = {n.split("-")[0].lower().replace("_", "-") for n in names}
    for project in projects:
        request = urllib.request.Request(f"{INDEX}/{project}/",
                                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            for f in json.load(response)["files"]:
                if f["filename"] in names:
                    sizes[f["filename"]] = f.get("size") or 0
    return sizes


def resolve(flavour: str, platform: str, python: str, workdir: Path) -> tuple[bool, str, dict]:
    files, extras = FLAVOURS[flavour]
    tags, env = PLATFORMS[platform]
    reqs = [r for f in files for r in read_requirements(ROOT / f)] + attnlib_requirements(extras)
    target_reqs = for_target(reqs, env, python)
    req_file = workdir / f"{flavour}-{platform}-{python}.txt"
    req_file.write_text("\n".join(target_reqs) + "\n")
    constraints = workdir / f"constraints-{flavour}-{platform}-{python}.txt"
    constraints.write_text("\n".join(for_target(read_requirements(ROOT / "constraints.txt"),
                                                env, python)) + "\n")
    report = workdir / f"{flavour}-{platform}-{python}.json"
    cmd = [sys.executable, "-c", _PIP_FOR_TARGET, json.dumps(marker_environment(env, python)),
           "install", "--dry-run", "--ignore-installed",
           "--quiet", "--report", str(report), "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--index-url", INDEX,
           "-r", str(req_file), "-c", str(constraints)]
    for tag in tags:
        cmd += ["--platform", tag]
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env_vars["PIP_CONFIG_FILE"] = os.devnull  # no local wheels, caps or extra indexes
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_vars)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return False, "\n      ".join(lines[-6:]), {}
    data = json.loads(report.read_text())
    return True, "", {item["metadata"]["name"].lower():
                      item["download_info"]["url"].rsplit("/", 1)[-1] for item in data["install"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one Python version per platform")
    parser.add_argument("--flavour", action="append", choices=sorted(FLAVOURS),
                        help="only this install flavour (repeatable; default: all)")
    parser.add_argument("--python", action="append", help="only this Python version")
    parser.add_argument("--jobs", type=int, default=4, help="resolutions run at once")
    args = parser.parse_args()
    if not index_reachable():
        print(f"SKIPPED: the package index {INDEX} cannot be reached, so whether the "
              "requirements resolve for users was not checked.")
        return 0
    flavours = args.flavour or list(FLAVOURS)
    pythons = args.python or (PYTHONS[-1:] if args.quick else PYTHONS)
    # every flavour on the newest Python (for the size table); on the older ones only the
    # two that the others are subsets of, the book's and the tests'
    cases = [(f, p, py) for p in PLATFORMS for py in pythons for f in flavours
             if py == pythons[-1] or f in ("book", "test") or args.flavour]
    failures, table = [], []
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = pool.map(lambda case: resolve(*case, Path(tmp)), cases)
        for (flavour, platform, python), (ok, why, wheels) in zip(cases, results):
            print(f"{'ok  ' if ok else 'FAIL'} {flavour:<10} {platform:<14} Python {python}"
                  + (f" ({len(wheels)} packages)" if ok else f"\n      {why}"), flush=True)
            if not ok:
                failures.append((flavour, platform, python))
            elif python == pythons[-1]:
                table.append((flavour, platform, wheels))
        sizes = file_sizes({w for _, _, wheels in table for w in wheels.values()})
    print(f"\nDownload size of each flavour (Python {pythons[-1]}, MiB; "
          "the largest packages in brackets):")
    for flavour, platform, wheels in table:
        by_size = sorted(((sizes.get(w, 0), n) for n, w in wheels.items()), reverse=True)
        total = sum(s for s, _ in by_size) / 2**20
        top = ", ".join(f"{n} {s / 2**20:.0f}" for s, n in by_size[:3])
        print(f"  {flavour:<10} {platform:<14} {total:8.0f}   [{top}]")
    if failures:
        print(f"\n{len(failures)} of the resolutions failed: {failures}")
        return 1
    print("\nEvery flavour resolves on every platform and Python version.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
