"""Rendering for the CLI: plain tables for people, JSON for scripts."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from .results import plain

# What a terminal would obey or reorder, beyond the C0 controls JSON escapes anyway: DEL, the
# C1 controls (CSI, OSC, ... in UTF-8: xterm and VTE act on them) and the bidi controls. Text
# from a sandbox (its output in events, file names) is hostile and is printed escaped.
_TERMINAL = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_TERMINAL_CELL = re.compile(f"[\x00-\x1f{_TERMINAL.pattern[1:-1]}]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def to_json(data: Any) -> str:
    # Still JSON: any character of a string may be written as its \u escape.
    return _TERMINAL.sub(_escape, json.dumps(data, indent=2, sort_keys=True, default=plain, ensure_ascii=False))


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    secs = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A left-aligned plain-text table; cells are cut at 60 characters."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip()]
    for row in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)


def _cell(value: Any) -> str:
    text = "-" if value is None or value == "" else str(value)
    text = _TERMINAL_CELL.sub(_escape, text.replace("\n", " "))
    return text if len(text) <= 60 else text[:57] + "..."


def pairs(items: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {_cell(v) if not isinstance(v, str) else v}" for k, v in items)


def progress(message: str) -> None:
    """A progress line on stderr, so stdout stays clean for --json."""
    print(f"… {message}", file=sys.stderr, flush=True)
