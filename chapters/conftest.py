"""pytest hooks for the notebooks under nbval: a table of each notebook's run time.

nbval makes one test item per cell; this sums the cells' durations per notebook (the
controller process sees every report, with or without pytest-xdist) and prints the
table at the end of ``make notebooks``, slowest first.
"""

from collections import defaultdict

_seconds = defaultdict(float)
_failed = set()


def pytest_runtest_logreport(report):
    notebook = report.nodeid.split("::")[0]
    if notebook.endswith(".ipynb"):
        _seconds[notebook] += report.duration
        if report.failed:
            _failed.add(notebook)


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    write = terminalreporter.write_line
    terminalreporter.section("notebook run times")
    write(f"{'notebook':<44} {'seconds':>8}")
    for notebook, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1]):
        flag = "  FAILED" if notebook in _failed else ""
        write(f"{notebook:<44} {seconds:8.1f}{flag}")
    write(f"{'total (summed over workers)':<44} {sum(_seconds.values()):8.1f}")
