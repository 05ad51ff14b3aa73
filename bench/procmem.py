"""This process's memory as Linux reports it, for the benchmarks that measure a stage's peak: the
resident set, its high-water mark, and a reset of that mark so a peak covers one stage alone."""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str) -> float:
    """One memory field of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise ValueError(f"/proc/self/status: no field '{field}'")


def reset_peak() -> None:
    """Set the high-water mark (VmHWM) to the current resident set (VmRSS)."""
    Path("/proc/self/clear_refs").write_text("5")
