"""The network guard that the unit tests and the notebooks run under (tests/offline)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = Path(__file__).parent / "offline"


def test_unit_tests_run_offline():
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1, never routed
    with pytest.raises(OSError, match="name lookup of 'example.com' refused"):
        socket.getaddrinfo("example.com", 80)


def test_loopback_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    client.close()
    server.close()


def test_notebook_kernels_run_offline(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
        "    print('connected')\n"
        "except OSError as e:\n"
        "    print(e)")]
    env_before = os.environ.get("IPYTHONDIR")
    os.environ["IPYTHONDIR"] = str(OFFLINE)
    try:
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=60).execute()
    finally:
        if env_before is None:
            os.environ.pop("IPYTHONDIR")
        else:
            os.environ["IPYTHONDIR"] = env_before
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "network access is blocked" in text, text
