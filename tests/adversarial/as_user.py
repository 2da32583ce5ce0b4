"""Play another local user: ``python -m tests.adversarial.as_user UID airlock ARGS...`` runs the
CLI, and ``... UID squat ADDRESS...`` binds addresses and reports every connection it gets.

The tests run as root; "another user" is this process after ``setuid(UID)``. The interpreter
starts as root (the venv's Python lives under /root, which other users cannot read) and
imports everything it needs first, then drops its groups, gid and uid for good, so every
socket it connects or binds and every file it opens is that user's, as the kernel sees it.

``squat`` prints ``ready`` once every address is tried (``bound ADDRESS`` or ``refused
ADDRESS ERRNO`` for each), then ``connection ADDRESS`` for every connection accepted, until
its stdin is closed. Addresses: ``tcp:HOST:PORT`` (``[::1]:PORT`` for IPv6) and ``unix:PATH``
(a stream socket, 0666).
"""

from __future__ import annotations

import os
import select
import socket
import sys


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    assert os.geteuid() == uid and os.getegid() == uid


def _bind(address: str) -> socket.socket:
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666)
    else:
        host, _, port = address[len("tcp:"):].rpartition(":")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((host.strip("[]"), int(port)))
    sock.listen(16)
    return sock


def squat(addresses: list[str]) -> int:
    bound: dict[socket.socket, str] = {}
    for address in addresses:
        try:
            bound[_bind(address)] = address
            print(f"bound {address}", flush=True)
        except OSError as exc:
            print(f"refused {address} {exc.errno}", flush=True)
    print("ready", flush=True)
    try:
        while True:
            readable, _, _ = select.select([*bound, sys.stdin], [], [], 60)
            if not readable:
                continue
            if sys.stdin in readable and not sys.stdin.readline():
                return 0
            for sock in readable:
                if sock in bound:
                    conn, _ = sock.accept()
                    print(f"connection {bound[sock]}", flush=True)
                    conn.close()
    finally:
        for sock in bound:
            sock.close()


def main(argv: list[str]) -> int:
    uid, command, rest = int(argv[0]), argv[1], argv[2:]
    if command == "airlock":
        # Everything a subcommand may import later, while root (cli imports each when it runs).
        import encodings.ascii  # looked up lazily once a conversion succeeds (an ASCII codec)

        import yaml  # _bundle's, for a model directory

        import airlock_client._admin_cli
        import airlock_client._convert_cli
        import airlock_client._migrate_cli
        import airlock_client._provenance_cli
        import airlock_client.cli

        _ = (encodings.ascii, yaml, airlock_client._admin_cli, airlock_client._convert_cli,
             airlock_client._migrate_cli, airlock_client._provenance_cli)
        _drop_to(uid)
        return airlock_client.cli.main(rest)
    if command == "squat":
        _drop_to(uid)
        return squat(rest)
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
