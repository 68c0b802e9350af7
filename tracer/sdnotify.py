"""sd_notify(3) without a dependency: tell systemd (``Type=notify``) that the tracer is
ready, what it is doing, and that it is stopping.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named in
``$NOTIFY_SOCKET``: a path, or an abstract socket written with a leading ``@``. Outside
systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ=None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=tracing vfs"``) to ``$NOTIFY_SOCKET``.

    Returns True if it was sent, False if there is no socket to send to. Raises OSError when
    the socket is named but refuses the datagram (the caller logs it once)."""
    addr = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]            # abstract namespace
    elif addr[0] != "/":
        return False                      # vsock:... (VMs) is not for a node agent
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True
