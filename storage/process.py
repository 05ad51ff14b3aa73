"""Which process wrote something: host/boot/pid-namespace identity and process start times.

Claims (storage.claims) and writer temporaries (storage.fs) record their writer with these, so a
later run can tell a dead writer's leftovers from a live writer's work on the same machine.
"""

from __future__ import annotations

import hashlib
import os
import socket


def _read_first_line(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.readline().strip()
    except OSError:
        return ""


def machine_id() -> str:
    """Where a pid means one process: host name, boot id and pid namespace."""
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}/{_read_first_line('/proc/sys/kernel/random/boot_id')}/{pidns}"


def machine_tag() -> str:
    """8 hex of :func:`machine_id`: short enough for a file name."""
    return hashlib.sha256(machine_id().encode()).hexdigest()[:8]


def _proc_stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name ([] when the process is gone)."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    # The command name is parenthesised and may contain spaces: split after its closing ')'.
    return stat.rsplit(")", 1)[-1].split() if stat else []


def process_start(pid: int) -> str:
    """Start time (clock ticks since boot) of a process, '' when unknown or gone."""
    fields = _proc_stat_fields(pid)
    return fields[19] if len(fields) > 19 else ""  # field 22 of the whole line


def process_exited(pid: int) -> bool:
    """True for a zombie or dead process: it exited but its parent has not reaped it yet."""
    fields = _proc_stat_fields(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def process_alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` of this machine, started at ``started`` ('' = unknown), still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    if process_exited(pid):
        return False
    now = process_start(pid)
    return not (now and started and now != started)
