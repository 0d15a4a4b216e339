"""Refuse network connections outside this machine, in the test process and in every Python
process it starts (this folder is put first on PYTHONPATH by tests/conftest.py).

Loopback and Unix sockets stay open: gloo and the DeepSpeed launcher use them.
"""

import ipaddress
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "", socket.gethostname()}


class NetworkBlockedError(ConnectionRefusedError):
    """A test tried to reach the network (model hub, dataset hub, ...)."""


def _is_local(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(address) -> None:
    if isinstance(address, tuple) and address and not _is_local(address[0]):
        raise NetworkBlockedError(f"network access blocked in tests: connection to {address[0]!r}")


def install() -> None:
    if getattr(socket, "_modular_netguard", False):
        return
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self, address):
        _check(address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _check(address)
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local(host):
            raise NetworkBlockedError(f"network access blocked in tests: name lookup of {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.getaddrinfo = guarded_getaddrinfo
    socket._modular_netguard = True


install()
