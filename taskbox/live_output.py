"""Live output of running commands, as ``exec.output`` events in the durable event log.

Whichever process runs a command (the CLI, an MCP server, the web server, an ultrawork run),
its output reaches every reader of the event log while it runs — the dashboard's live
command log, ``/api/events`` — because it is recorded there, not held in one process.

Command output is hostile and can be huge, so what is recorded is bounded at every step:

- a command shorter than :data:`INTERVAL` records nothing here (its ``task.exec`` event and
  the execution log have it); a longer one records a first event (``seq`` 0, the command)
  and then, every :data:`INTERVAL`, one event per stream with the new output;
- at most :data:`RATE` bytes per second per task (a burst of :data:`BURST`; the budget is
  kept by each process, shared by its commands in that task), at most :data:`CHUNK` per
  event and :data:`EXEC_LIMIT` per command; output past the budget is skipped — the next
  event says how many bytes (``skipped``) and carries the newest text. The bytes counted
  are those the log stores: the text JSON-escaped (a control byte takes six) plus the
  event's own fields and command, so neither escapes nor many tiny events get past it. So
  the durable log grows by at most about 14 MiB an hour per busy task (and two events per
  command: its first and its last), and by nothing for quick commands;
- the bytes waiting between two events are capped (:data:`PENDING_LIMIT`, oldest dropped);
- secrets never appear: text is redacted before it is recorded, and a stream is only cut
  where no secret value straddles the cut (the rest waits for the next event), so a value
  split across two chunks is redacted whole; where the pending cap dropped bytes, the
  text held back before them and the first characters after them go too (either may be a
  piece of a secret whose rest was dropped);
- the wrapper's end-of-output marker (:mod:`taskbox.sandbox`) is taken out;
- the log keeps a task's newest :data:`KEEP_EVENTS` of these events: older ones are deleted
  when a command ends, and all of them with the task (they are for following a command
  live; its whole result is in its ``task.exec`` event and the execution log). So the
  event table does not grow without bound with the output of long-lived busy tasks.

The last event has ``done: true`` and the exit code (``null`` when the command did not end
normally: a timeout, a cancel, a lost container).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .sandbox import ExecControl
    from .secrets import Redactor

log = logging.getLogger("taskbox.live_output")
INTERVAL = 0.5  # seconds between two events of a running command
RATE = 4096  # bytes of output per second per task
BURST = 16384  # bytes a quiet task may record at once
CHUNK = 4096  # bytes of text in one event
EXEC_LIMIT = 1024 * 1024  # bytes of text one command may record in all
PENDING_LIMIT = 64 * 1024  # bytes of one stream held between two events
LINE_WAIT = 2048  # characters of an unfinished line held back for its end
COMMAND_CHARS = 200
STREAMS = ("stdout", "stderr")
KEEP_EVENTS = 2000  # a task's newest exec.output events kept in the log when a command ends
EVENT_ROW = 64  # bytes of an event's row besides its payload (id, type, task, time)
_MARKER = re.compile(r"\n?__taskbox_end_[0-9a-f]{16}__ -?\d+\n?")
_MARKER_START = "__taskbox_end_"


class Budgets:
    """Token buckets of output bytes, one per task, shared by its commands in this process."""

    def __init__(self, rate: float = RATE, burst: float = BURST) -> None:
        self.rate = rate
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # task -> (tokens, when)

    def take(self, task_id: str, wanted: int, minimum: int = 0) -> int:
        """How many of ``wanted`` bytes the task may record now (taken from its bucket); none
        while it has fewer than ``minimum`` (an event's own size: never paid for nothing)."""
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(task_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            granted = int(min(tokens, wanted)) if tokens >= minimum else 0
            self._buckets[task_id] = (tokens - granted, now)
            if len(self._buckets) > 10_000:  # tasks long gone
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 3600}
        return granted


@dataclass
class _Stream:
    raw: bytearray = field(default_factory=bytearray)
    text: str = ""  # decoded, not recorded yet
    dropped: int = 0  # bytes dropped (over the pending cap) since the last event
    cut: bool = False  # the front was dropped: what follows may start inside a secret
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))


class Streamer:
    """Records one running command's output as ``exec.output`` events (see the module doc).

    ``record(payload)`` writes one event; it is called from this streamer's thread and from
    :meth:`close`. Use :func:`start`.
    """

    def __init__(self, task_id: str, command: str, control: ExecControl, redactor: Redactor,
                 record: Callable[[dict[str, Any]], object], budgets: Budgets, interval: float = INTERVAL) -> None:
        self.task_id = task_id
        self.command = redactor.text(command)[:COMMAND_CHARS]
        self.exec_id = control.exec_id
        self.redactor = redactor
        self.record = record
        self.budgets = budgets
        self.interval = interval
        self.seq = 0
        self.sent = 0  # bytes of text recorded
        self.seen = 0  # bytes of output the command wrote
        self.skipped = 0  # bytes of output not recorded (budget, caps)
        self._unsaid = 0  # of those, bytes no event has counted yet
        # The stored size of an event besides its text (its fields, the command, the row).
        self._overhead = EVENT_ROW + _stored(self.command) + len(json.dumps(
            {"exec_id": self.exec_id, "seq": 10**9, "stream": "stdout", "text": "", "command": "",
             "skipped": 10**12}))
        self._streams = {s: _Stream() for s in STREAMS}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"taskbox-live-{self.exec_id}", daemon=True)

    # --- the command's side: chunks as they come ---

    def feed(self, stream: str, chunk: bytes) -> None:
        s = self._streams.get(stream)
        if s is None or not chunk:
            return
        with self._lock:
            self.seen += len(chunk)
            s.raw += chunk
            over = len(s.raw) - PENDING_LIMIT
            if over > 0:
                del s.raw[:over]
                s.dropped += over
                s.cut = True

    # --- the streamer's side ---

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush(final=False)
            except Exception as exc:  # noqa: BLE001 - a full disk or a busy registry must not touch the command
                log.warning("live output of %s in %s not recorded: %s: %s", self.exec_id, self.task_id,
                            type(exc).__name__, exc)

    def flush(self, *, final: bool) -> None:
        """Record the output that came since the last event (all of it when ``final``)."""
        with self._flush_lock:
            events = []
            for name, s in self._streams.items():
                payload = self._take(name, s, final)
                if payload is not None:
                    events.append(payload)
            if self.seq == 0 and not events and not final:
                events.append(self._payload(None, ""))  # it runs: say so, with its command
            for payload in events:
                self.record(payload)

    def _take(self, name: str, s: _Stream, final: bool) -> dict[str, Any] | None:
        with self._lock:
            raw, s.raw = bytes(s.raw), bytearray()
            dropped, s.dropped = s.dropped, 0
            front_cut, s.cut = s.cut, False
        if front_cut:
            s.decoder.reset()
        new = s.decoder.decode(raw, final=final)
        longest = self.redactor.longest()
        if front_cut and longest > 1:
            # A secret may straddle the dropped bytes on either side: the text held back before
            # them may end with its head, the first characters after them may be its tail.
            head = min(len(new), longest - 1)
            dropped += len(s.text.encode()) + len(new[:head].encode())
            s.text, new = "", new[head:]
        text = s.text + new
        cut = len(text) if final else self._cut(text, longest)
        out, s.text = text[:cut], text[cut:]
        if name == "stdout":
            out = _MARKER.sub("", out) if _MARKER_START in out else out
        out = self.redactor.text(out) if longest else out
        if not out and not dropped:
            return None
        # What the event costs is what the log stores: the text JSON-escaped (a control byte
        # is six bytes there) and the event's own fields, so neither a flood of escapes nor
        # many one-line events get past the budget.
        cost = _stored(out)
        room = min(CHUNK, max(0, EXEC_LIMIT - self.sent))
        want = min(cost, room)
        granted = self.budgets.take(self.task_id, want + self._overhead, self._overhead + 1) if want else 0
        allowed = max(0, granted - self._overhead)
        if allowed < cost:
            # Over the budget: the newest text is what a live view wants; the rest is counted.
            keep = _tail(out, allowed)
            dropped += len(out.encode()) - len(keep.encode())
            out = keep
        self.skipped += dropped
        self._unsaid += dropped
        self.sent += _stored(out)
        if not out and self.seq > 0:
            return None  # nothing to show now; the count goes out with the next event
        skipped, self._unsaid = self._unsaid, 0
        return self._payload(name, out, skipped)

    def _cut(self, text: str, longest: int) -> int:
        """Where the text may be cut now: before an unfinished line (unless it is long), and
        never inside a secret value — the last ``longest - 1`` characters wait (a secret may be
        arriving), and a cut that would split a whole secret moves before it."""
        end = len(text)
        newline = text.rfind("\n")
        if end - (newline + 1) <= LINE_WAIT:
            end = newline + 1
        if longest > 1:
            end = max(0, min(end, len(text) - (longest - 1)))
            while end > 0 and (start := self.redactor.straddling(text, end)) is not None:
                end = start
        return end

    def _payload(self, stream: str | None, text: str, skipped: int = 0) -> dict[str, Any]:
        payload: dict[str, Any] = {"exec_id": self.exec_id, "seq": self.seq, "stream": stream, "text": text,
                                   "command": self.command}
        if skipped:
            payload["skipped"] = skipped
        self.seq += 1
        return payload

    def start(self) -> Streamer:
        self._thread.start()
        return self

    def close(self, exit_code: int | None) -> None:
        """The command is over: record the rest of its output and the last event (``done``),
        unless it ended before its first event was due."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self.seq == 0:
            return
        try:
            self.flush(final=True)
            self.record({"exec_id": self.exec_id, "seq": self.seq, "stream": None, "text": "", "done": True,
                         "exit_code": exit_code, "bytes": self.seen, "command": self.command,
                         **({"skipped": self.skipped} if self.skipped else {})})
            self.seq += 1
        except Exception as exc:  # noqa: BLE001 - the command's own result must still reach its caller
            log.warning("the end of %s's live output in %s was not recorded: %s: %s", self.exec_id, self.task_id,
                        type(exc).__name__, exc)


def _stored(text: str) -> int:
    """The bytes ``text`` takes in the event log (JSON, every non-ASCII character escaped)."""
    return len(json.dumps(text)) - 2


def _char_cost(ch: str) -> int:
    o = ord(ch)
    if 0x20 <= o < 0x7F:
        return 2 if ch in '"\\' else 1
    if ch in "\n\r\t\b\f":
        return 2
    return 12 if o > 0xFFFF else 6


def _tail(text: str, limit: int) -> str:
    """The newest characters of ``text`` whose stored size is at most ``limit``."""
    size, i = 0, len(text)
    while i > 0:
        n = _char_cost(text[i - 1])
        if size + n > limit:
            break
        size, i = size + n, i - 1
    return text[i:]


def start(task_id: str, command: str | list[str], control: ExecControl, redactor: Redactor,
          record: Callable[[dict[str, Any]], object], budgets: Budgets, interval: float = INTERVAL) -> Streamer:
    """Stream ``control``'s output as events while the command runs; call ``close`` when it is over."""
    text = command if isinstance(command, str) else " ".join(command)
    streamer = Streamer(task_id, text, control, redactor, record, budgets, interval)
    control.tap = streamer.feed
    return streamer.start()
