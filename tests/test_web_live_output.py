"""Live command output as ``exec.output`` events (taskbox.live_output): the bounds, the
redaction across chunk boundaries and the marker, driven chunk by chunk without Docker.
The end-to-end proof (a CLI process's command streaming to /api/events and to the
dashboard) is in test_web.py and test_web_browser.py."""

from __future__ import annotations

from typing import Any

import pytest

from taskbox import events, live_output
from taskbox.sandbox import ExecControl
from taskbox.secrets import Redactor

SECRET = "s3cr3t-Value-0123456789"


def streamer(budgets: live_output.Budgets | None = None, secret: bool = True
             ) -> tuple[live_output.Streamer, ExecControl, list[dict[str, Any]]]:
    redactor = Redactor(None)
    if secret:
        redactor.add({"API_KEY": SECRET})
    got: list[dict[str, Any]] = []

    def record(payload: dict[str, Any]) -> None:
        events.check("exec.output", payload)  # every field is catalogued
        got.append(payload)

    control = ExecControl()
    # A long interval: the test flushes by hand, the streamer's own thread never does.
    s = live_output.start("t1", f"deploy --key {SECRET}", control, redactor, record,
                          budgets or live_output.Budgets(), interval=3600)
    return s, control, got


def text_of(got: list[dict[str, Any]], stream: str = "stdout") -> str:
    return "".join(e["text"] for e in got if e["stream"] == stream)


def test_a_secret_split_across_chunks_and_events_never_appears() -> None:
    s, control, got = streamer()
    half = len(SECRET) // 2
    control.feed(b"line one\nkey=" + SECRET[:half].encode(), "stdout")
    s.flush(final=False)
    control.feed(SECRET[half:].encode() + b" tail\n", "stdout")
    s.flush(final=False)
    control.feed(b"err " + SECRET[:3].encode(), "stderr")
    s.flush(final=False)
    control.feed(SECRET[3:].encode() + b"\n", "stderr")
    s.close(0)
    assert all(SECRET not in str(e) and SECRET[:half] not in str(e) and SECRET[half:] not in str(e) for e in got)
    assert text_of(got) == "line one\nkey=[REDACTED:API_KEY] tail\n"
    assert text_of(got, "stderr") == "err [REDACTED:API_KEY]\n"
    assert "[REDACTED:API_KEY]" in got[0]["command"]
    assert [e["seq"] for e in got] == list(range(len(got)))
    assert got[-1]["done"] is True and got[-1]["exit_code"] == 0 and got[-1]["exec_id"] == control.exec_id


def test_the_wrapper_marker_and_unfinished_lines() -> None:
    s, control, got = streamer(secret=False)
    control.feed(b"progress 10%", "stdout")
    s.flush(final=False)  # an unfinished line waits for its end (the marker may be arriving)
    assert got == [{"exec_id": control.exec_id, "seq": 0, "stream": None, "text": "",
                    "command": f"deploy --key {SECRET}"}]
    control.feed(b" 20%\nlast", "stdout")
    s.flush(final=False)
    control.feed(b"\n__taskbox_end_0123456789abcdef__ 3\n", "stdout")
    s.close(3)
    assert text_of(got) == "progress 10% 20%\nlast"
    assert got[-1]["exit_code"] == 3 and got[-1]["bytes"] > 0


def test_a_quick_command_records_nothing() -> None:
    s, control, got = streamer()
    control.feed(b"done at once\n", "stdout")
    s.close(0)
    assert got == []


def test_output_past_the_budget_is_skipped_and_counted() -> None:
    budgets = live_output.Budgets(rate=0, burst=1000)
    s, control, got = streamer(budgets, secret=False)
    flood = b"".join(b"%06d flood line\n" % i for i in range(4000))  # 68 KB, past the pending cap too
    control.feed(flood, "stdout")
    s.flush(final=False)
    control.feed(b"the end\n", "stdout")
    s.close(1)
    sent = text_of(got)
    assert len(sent.encode()) <= 1000
    assert sent.endswith("\n") and "flood line" in sent  # the newest text, not the oldest
    assert got[-1]["skipped"] == len(flood) + len(b"the end\n") - len(sent.encode())
    assert got[-1]["bytes"] == len(flood) + len(b"the end\n")


def test_a_dropped_front_takes_a_cut_secret_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_output, "PENDING_LIMIT", 100)
    s, control, got = streamer()
    # Past the pending cap the oldest bytes go: here the cut falls inside the secret, and
    # what is left of it must not be recorded as plain text.
    control.feed(SECRET.encode() + b"\nafter\n" + b"y" * 80, "stdout")
    s.flush(final=False)
    s.close(0)
    assert SECRET[10:] not in str(got) and SECRET[-6:] not in str(got)
    assert text_of(got) == "y" * 78
    assert got[-1]["skipped"] == 10 + len(SECRET[10:]) + len("\nafter\n") + 2


def test_budgets_are_per_task() -> None:
    b = live_output.Budgets(rate=0, burst=100)
    assert b.take("a", 80) == 80 and b.take("a", 80) == 20 and b.take("a", 5) == 0
    assert b.take("b", 80) == 80


def test_a_failing_event_log_never_fails_the_command() -> None:
    redactor = Redactor(None)
    control = ExecControl()
    calls: list[dict[str, Any]] = []

    def record(payload: dict[str, Any]) -> None:
        calls.append(payload)
        if len(calls) > 1:
            raise OSError("disk full")

    s = live_output.start("t1", "make", control, redactor, record, live_output.Budgets(), interval=3600)
    s.flush(final=False)  # the first event goes in
    control.feed(b"more\n", "stdout")
    s.close(0)  # the log fails now: close says so in the log and returns
    assert [c["seq"] for c in calls] == [0, 1]
