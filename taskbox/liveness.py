"""Process liveness: who holds a lease, and whether that process still lives.

A long-lived holder (the MCP server) records itself with each lease it takes, as
``host|boot id|pid|start time``: the start time (``/proc/<pid>/stat`` field 22, in clock
ticks since boot) tells the holder from a later process that reuses its pid, and the boot
id (``/proc/sys/kernel/random/boot_id``) from one of an earlier boot. Another process on the
same host can then tell at once that the holder is dead, instead of waiting for its lease
to expire. A holder on another host cannot be judged from here: its lease runs its course.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket


@functools.cache
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses itself.
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall: the third after the name is field 3
    except (IndexError, ValueError):
        return None


def identity() -> str:
    """This process, as a lease records its holder."""
    return _identity(os.getpid())  # by pid: a forked child is another holder


@functools.cache
def _identity(pid: int) -> str:
    return f"{socket.gethostname()}|{boot_id()}|{pid}|{start_time(pid) or 0}"


def alive(holder: str | None) -> bool | None:
    """Whether a recorded holder still lives: True, False, or None when it cannot be told
    (no holder recorded, another host, an unreadable record)."""
    if not holder:
        return None
    parts = holder.split("|")
    if len(parts) != 4 or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    host, boot, pid, start = parts[0], parts[1], int(parts[2]), int(parts[3])
    if host != socket.gethostname():
        return None
    if boot and boot_id() and boot != boot_id():
        return False  # it ran before this host last booted
    now = start_time(pid)
    return now is not None and now == start


def token(holder: str) -> str:
    """A short name for a holder, carried in the marks of the commands it starts."""
    return "o" + hashlib.sha256(holder.encode()).hexdigest()[:12]


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists on this host (it may be a later one reusing the
    pid: use :func:`alive` with a recorded identity when that matters)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
