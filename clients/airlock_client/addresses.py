"""What a broker address says about where the broker is. Standard library only.

Shared by the client (which sends a loopback token, and offers the same-host fast path, only to
an address that can be nothing but this machine) and the broker (which refuses to listen
without authentication anywhere else), so that both sides draw the line in the same place.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(address: str) -> bool:
    """Whether ``address`` can only be this machine.

    ``address`` is a gRPC target (``HOST:PORT``, ``[::1]:PORT``, ``dns:///HOST:PORT``,
    ``ipv4:``/``ipv6:`` forms) or a listen address. Literal loopback IPs, ``localhost`` and unix
    sockets count; any other host name does not, since it may resolve to anything.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[-1] if address.startswith("dns:") else address
    target = target.removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rpartition(":")[0] if ":" in target else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
