"""Short human-readable forms shared by the command line's tables (alerts, silences):
neutral ground, so sinks and analytics need not import each other."""

from __future__ import annotations


def age(seconds: float) -> str:
    """'45s', '12m', '3h20m', '2d4h'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"
