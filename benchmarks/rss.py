"""Resident-memory readings of this process (stdlib only): the one harness the benchmarks and
`etrace-compare` share. Peak = the kernel's high-water mark (VmHWM), resettable on Linux."""

from __future__ import annotations

import sys

__all__ = ["rss_mb", "peak_rss_mb", "reset_peak_rss", "ru_maxrss_mb"]


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def ru_maxrss_mb() -> float:
    """getrusage's peak RSS in MiB (on Linux it also counts the forked parent copy before exec)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def rss_mb() -> float:
    """This process's current resident set size in MiB (NaN where /proc is missing)."""
    value = _proc_status_mb("VmRSS")
    return float("nan") if value is None else value


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB; getrusage where /proc is missing."""
    value = _proc_status_mb("VmHWM")
    return ru_maxrss_mb() if value is None else value


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
