"""The sandbox's uid and gid are nobody's on the host; and what ``ptrace_scope`` lets through.

Sandboxes run without user-namespace remapping, so the container's uid 10001 *is* host uid
10001. If a host account has that uid (or its group that gid), the account owns every
sandbox's processes and files: it may signal them, read their memory (``ptrace``,
``/proc/<pid>/mem``) while a confidential model is being converted, or tamper with a
conversion in flight; and code that escaped a sandbox lands as that account, with its home
directory, keys and crontab. The broker therefore refuses to start while a host account or
group uses the sandbox's ids (``SandboxPolicy.host_account_check``, default ``"refuse"``;
``"warn"`` starts anyway, logged, and listed in every job's ``weakened``).

``kernel.yama.ptrace_scope`` is the second wall. At 0 (or without Yama, which is the same:
classic ptrace rules) any process of the same uid may attach to a sandbox; at 1 only its
ancestors may, which no user process is (sandboxes descend from the container runtime); 2 and
3 forbid more still. From inside, a sandbox sees nothing to attach to (it has its own pid
namespace, and seccomp refuses ``ptrace``), so the attacker this wall stops is a host process
running as the sandbox uid. With no account on that uid (checked here) only root could start
one, and root may attach at any scope below 3. So 0 fails the self-test's check but is
*waived* while the account check holds, visibly in every report; when accounts share the ids
(``"warn"``) it is not waived. Raising it costs nothing: ``sysctl kernel.yama.ptrace_scope=1``.
"""

from __future__ import annotations

import grp
import logging
import pwd
from collections.abc import Callable
from pathlib import Path

from airlock_broker.sandboxes.sandbox import SandboxUnavailable
from airlock_sandbox.policy import SandboxPolicy

log = logging.getLogger(__name__)

#: id -> the host account (or group) that has it, or None.
Lookup = Callable[[int], str | None]
#: The Yama setting as the host reports it, or None without Yama.
ReadScope = Callable[[], str | None]

PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
#: The settings that keep a same-uid host process from attaching to a sandbox.
SAFE_SCOPES = frozenset({"1", "2", "3"})
_SCOPES = {"0": "classic: any process of the same uid may attach",
           "1": "restricted: only a process's ancestors may attach",
           "2": "admin-only: attaching needs CAP_SYS_PTRACE",
           "3": "no process may attach"}
ADVICE = ('give sandboxes ids no host account uses ([sandbox] user = "UID:GID") or remove '
           'the account; [sandbox] host_account_check = "warn" starts anyway, visibly')


def account_of_uid(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def group_of_gid(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def read_ptrace_scope() -> str | None:
    try:
        return PTRACE_SCOPE.read_text().strip()[:8]
    except OSError:
        return None


def describe_scope(scope: str | None) -> str:
    meaning = _SCOPES.get(scope or "", "no Yama: classic ptrace rules, as 0")
    return f"kernel.yama.ptrace_scope = {scope or 'absent'} ({meaning})"


def shared_ids(policy: SandboxPolicy, users: Lookup | None = None,
               groups: Lookup | None = None) -> list[str]:
    """What on the host shares the sandbox's uid and gid; empty when nothing does."""
    users = users or account_of_uid
    groups = groups or group_of_gid
    uid, _, gid = policy.user.partition(":")
    found = []
    for kind, text, lookup, what in (("uid", uid, users, "account"),
                                     ("gid", gid, groups, "group")):
        if not (text.isascii() and text.isdigit()):
            # A name (or nothing) is resolved by the engine inside the image: the host cannot
            # say who else has it, and a missing gid lets the engine pick the image's (or 0).
            found.append(f"the sandbox {kind} is {text!r}, not a number the host can check")
        elif (name := lookup(int(text))) is not None:
            found.append(f"{kind} {text}, which sandboxes run as, is the host {what} {name!r}")
    return found


def check_at_start(policy: SandboxPolicy, users: Lookup | None = None,
                   groups: Lookup | None = None) -> None:
    """Refuse to start (``SandboxUnavailable``) while host accounts share the sandbox's ids,
    unless the policy says ``"warn"``."""
    found = shared_ids(policy, users, groups)
    if not found:
        return
    text = "; ".join(found)
    if policy.host_account_check == "warn":
        log.warning("%s; starting anyway (host_account_check = \"warn\"): %s", text, ADVICE)
        return
    raise SandboxUnavailable(f"{text}: {ADVICE}")
