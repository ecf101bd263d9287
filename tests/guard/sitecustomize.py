"""Loaded by every Python process started with this folder on PYTHONPATH (tests only).

- Network: a connection or name lookup for anything but loopback is refused and written to $QLORA_GUARD_LOG.
- bitsandbytes / peft: at exit, a process that has them in sys.modules writes that to the same log (importing
  them is allowed, so optional-package probes behave as usual; what counts is whether anything loaded them).
"""

import atexit
import os
import socket
import sys

_LOG = os.environ.get("QLORA_GUARD_LOG")


def _note(message: str) -> None:
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {' '.join(sys.argv[:3])[:120]}: {message}\n")


def _local(host: object) -> bool:
    h = str(host)
    return h in ("localhost", "::1", "0.0.0.0", "", "None") or h.startswith("127.")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guard(sock: socket.socket, address: object) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):  # type: ignore[index]
        _note(f"connect {address}")
        raise OSError(f"network access blocked by the offline test: {address}")


def connect(self: socket.socket, address: object) -> None:
    _guard(self, address)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: object) -> int:
    _guard(self, address)
    return _connect_ex(self, address)


def getaddrinfo(host: object, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
    if not _local(host):
        _note(f"resolve {host}")
        raise socket.gaierror(f"name lookup blocked by the offline test: {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = getaddrinfo


@atexit.register
def _report_oracles() -> None:
    for name in ("bitsandbytes", "peft"):
        if name in sys.modules:
            _note(f"imported {name}")
