"""Client-supplied values quoted in error messages: escaped and cut short.

Header strings, names and paths can be megabytes long or hold control characters; a message that quotes
one whole could exceed gRPC's metadata limit or forge lines in a log.
"""

from __future__ import annotations

from typing import Any

# Longest quoted value in a message, and what ends one cut short.
MAX_SHOWN = 200
CUT_MARK = "...(cut)"


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """repr of a value: quoted, escaped (no lone surrogates, no raw control characters), and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + CUT_MARK


def loggable(value: object, limit: int = MAX_SHOWN) -> str:
    """A value for a log line: control characters escaped (CR, LF, ESC, ... never reach the log raw, so a
    client cannot forge lines or colour a terminal) and cut to `limit` characters."""
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else text[:limit] + CUT_MARK
