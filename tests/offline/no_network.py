"""Make every network connection fail, except to this machine.

The book promises that nothing downloads at run time.  This guard turns that promise
into a test: the unit tests import it from ``tests/conftest.py``, and the notebooks'
kernels run it at start-up (``make notebooks`` and ``make book-strict`` point
``IPYTHONDIR`` at ``tests/offline``, whose start-up file imports this module).  A
connection to anything but a loopback address or a Unix socket raises ``OSError``
naming the address.
"""

from __future__ import annotations

import ipaddress
import socket

_ALLOWED_HOSTS = {"localhost", "localhost.localdomain", ""}


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0] if isinstance(address, tuple) and address else address
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or host in _ALLOWED_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it would need DNS


class NetworkAccessBlocked(OSError):
    pass


def install() -> None:
    """Patch ``socket.socket.connect``/``connect_ex`` (idempotent)."""
    if getattr(socket.socket.connect, "_attnlib_guard", False):
        return
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self, address):
        if not _is_local(address):
            raise NetworkAccessBlocked(
                f"network access is blocked while the book's tests run: connect to "
                f"{address!r} refused (the book must not download anything at run time)")
        return original_connect(self, address)

    def connect_ex(self, address):
        if not _is_local(address):
            raise NetworkAccessBlocked(
                f"network access is blocked while the book's tests run: connect_ex to "
                f"{address!r} refused")
        return original_connect_ex(self, address)

    original_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local((host,)):
            raise NetworkAccessBlocked(
                f"network access is blocked while the book's tests run: name lookup of "
                f"{host!r} refused")
        return original_getaddrinfo(host, *args, **kwargs)

    connect._attnlib_guard = True
    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
