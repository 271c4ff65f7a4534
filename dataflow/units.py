"""Byte sizes as people write them ("4GiB", "512 MB") and as we print them."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "is_int", "parse_bytes", "plural"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str) -> int:
    """``"4GiB"`` -> 4294967296; ints pass through. Raises ValueError naming the value."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative; got {value}")
        return value
    match = _SIZE.match(str(value))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"not a size: {value!r} (try e.g. 512MiB, 4GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(nbytes: int) -> str:
    """4294967296 -> '4.0 GiB'."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def is_int(value: object) -> bool:
    """An int that is not a bool (``True`` is an int to Python, not a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def plural(count: int, noun: str) -> str:
    """``1 GPU``, ``2 GPUs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
