"""Client-supplied values as they may appear in the gateway's log lines."""

from __future__ import annotations

# Longest client value in a log line.
MAX_LOGGED = 200


def loggable(value: object) -> str:
    """A client's value for the log: control characters escaped (no forged lines, no terminal escapes), cut."""
    text = repr(str(value))[1:-1]
    return text if len(text) <= MAX_LOGGED else text[:MAX_LOGGED] + "...(cut)"
