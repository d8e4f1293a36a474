"""Attacks on the live output events (taskbox.live_output, ``exec.output``) and the web
routes merged with them: real Docker, real commands in a real sandbox, real event log.

What a sandbox prints is hostile: it chooses the bytes, their timing and their volume. These
tests print what an attacker would to get a secret's piece into the durable event log, or to
make the log grow faster than the per-task budget the docs promise.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskbox import TaskService, live_output, web

from .conftest import run_cli
from .webserver import running

SECRET = "Zq8-leak-me-if-you-can-77"  # 25 characters


def _output_events(svc: TaskService, task_id: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in svc.events(task_id) if e["type"] == "exec.output"]


def test_a_secret_cut_by_the_pending_cap_never_leaks_its_tail(home: Path, repo: Path, docker_engine: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBOX_SECRET_API_KEY", SECRET)
    svc = TaskService(home)
    task = svc.create_task(repo, "secret split by the pending cap")
    # 1. A first line, streamed: the streamer holds its last characters back (a secret may be
    #    arriving). 2. Within one interval, more than the pending cap (64 KiB) so its oldest
    #    bytes are dropped — the cut lands 12 characters before the secret's end — followed by
    #    text shaped like the wrapper's end marker (taken out of the live text, so the tail of
    #    the secret is all that is left of that event and no size bound trims it away).
    tail = 12
    digits = live_output.PENDING_LIMIT - tail - len("\n__taskbox_end_0123456789abcdef__ ") - 1
    script = ("printf 'a first line, longer than any secret value is\\n'; sleep 1.5; "
              "{ head -c 5000 /dev/zero | tr '\\0' B; printf '%s' \"$API_KEY\"; "
              f"printf '\\n__taskbox_end_0123456789abcdef__ '; head -c {digits} /dev/zero | tr '\\0' 1; "
              "printf '\\n'; } ; sleep 1.5; echo done")
    result = svc.exec(task.id, ["sh", "-c", script], secrets=["API_KEY"])
    assert result.exit_code == 0, result.stderr
    got = _output_events(svc, task.id)
    assert got and got[-1].get("done") is True
    assert any(p.get("skipped") for p in got)  # the pending cap did drop bytes
    stored = json.dumps(got)
    for k in (tail, 8, 6):
        assert SECRET[-k:] not in stored, f"the last {k} characters of the secret are in the event log"
    assert SECRET not in stored and SECRET[:12] not in stored


BURST = 4000


def _stored(payloads: list[dict[str, Any]]) -> int:
    """What the log holds for the streamed text: each event's JSON (as the registry writes it),
    but a command's first event without text and its last (``done``): one each per command."""
    return sum(len(json.dumps(p, sort_keys=True)) for p in payloads if p["stream"] is not None)


def test_a_flood_of_control_bytes_stores_no_more_than_the_budget(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "escape flood")
    burst = BURST
    stored = _stored
    # Control bytes: one byte of output, six in the log (JSON escapes them as \u0001).
    svc.output_budgets = live_output.Budgets(rate=0, burst=burst)
    flood = "for i in 1 2 3 4; do head -c 2000 /dev/zero | tr '\\0' '\\001'; echo; sleep 0.7; done"
    r = svc.exec(task.id, ["sh", "-c", flood])
    assert r.exit_code == 0, r.stderr
    got = _output_events(svc, task.id)
    assert any("\x01" in p["text"] for p in got)  # some of it streamed
    assert stored(got) <= burst, f"{stored(got)} bytes stored for a budget of {burst}"


def test_many_one_line_events_store_no_more_than_the_budget(svc: TaskService, repo: Path) -> None:
    # Each event costs its fields and its command in the log, not just its one byte of text.
    task = svc.create_task(repo, "event flood")
    burst, stored = BURST, _stored
    svc.output_budgets = live_output.Budgets(rate=0, burst=burst)
    before = {e["id"] for e in svc.events(task.id)}
    errors: list[str] = []

    def trickle() -> None:
        try:
            svc.exec(task.id, ["sh", "-c", "for i in $(seq 16); do echo; sleep 0.25; done"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=trickle) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = [e["payload"] for e in svc.events(task.id) if e["type"] == "exec.output" and e["id"] not in before]
    assert len({p["exec_id"] for p in got}) == 8
    assert stored(got) <= burst, f"{stored(got)} bytes stored for a budget of {burst}"


def test_the_event_log_keeps_only_a_task_s_newest_live_output(svc: TaskService, repo: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A busy task's live output was kept forever (~14 MiB an hour of it): now the newest
    # KEEP_EVENTS stay when a command ends. A small number here, to see it with few commands.
    monkeypatch.setattr(live_output, "KEEP_EVENTS", 6)
    task = svc.create_task(repo, "long-lived busy task")
    other = svc.create_task(repo, "its neighbour")
    svc.exec(other.id, ["sh", "-c", "for i in 1 2 3 4 5; do echo n$i; sleep 0.3; done"])
    theirs = [e["id"] for e in svc.events(other.id, types=["exec.output"])]
    for n in range(3):
        r = svc.exec(task.id, ["sh", "-c", f"for i in 1 2 3 4 5 6; do echo run{n}-$i; sleep 0.3; done"])
        assert r.exit_code == 0, r.stderr
    kept = svc.events(task.id, types=["exec.output"])
    assert 0 < len(kept) <= 6
    assert kept[-1]["payload"].get("done") is True and "run2" in kept[-1]["payload"]["command"]
    assert [e["id"] for e in svc.events(other.id, types=["exec.output"])] == theirs  # another task's stay
    assert len([e for e in svc.events(task.id) if e["type"] == "task.exec"]) == 3  # the results stay


# --- the new routes: sub-tasks, merge, template -----------------------------------------------


def test_a_page_or_another_origin_cannot_merge_or_read_sub_tasks(svc: TaskService, repo: Path) -> None:
    target = svc.create_task(repo, "merge target", task_id="mtarget")
    source = svc.create_task(repo, "merge source", task_id="msource")
    assert svc.exec(source.id, "echo merged > from_source.txt").exit_code == 0
    landed = Path(target.workspace_path) / "from_source.txt"
    with running(svc) as base, httpx.Client(base_url=base, timeout=120) as c:
        merge = "/api/tasks/msource/merge"
        for headers in ({"origin": "http://evil.example"}, {"origin": "null"},
                        {"sec-fetch-site": "cross-site"}, {"host": "evil.example"}):
            r = c.post(merge, json={"into": "mtarget"}, headers=headers)
            assert r.status_code == 403, (headers, r.text)
        # A cross-site form cannot send JSON, and a simple (no preflight) text/plain POST is refused.
        for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            r = c.post(merge, content=b'{"into": "mtarget"}', headers={"content-type": ctype})
            assert r.status_code == 400, (ctype, r.text)
        # DNS rebinding: another host name is refused for reads too; no CORS header is ever sent.
        assert c.get("/api/tasks/msource/subtasks", headers={"host": "evil.example"}).status_code == 403
        r = c.get("/api/tasks/msource/subtasks", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        # A template name is a name, never a path.
        for name in ("../../etc/passwd", "/etc/passwd", "..", "a/b"):
            r = c.post("/api/tasks", json={"repo": str(repo), "description": "t", "template": name},
                       headers={"origin": base})
            assert r.status_code in (400, 404), (name, r.text)
            assert "root:" not in r.text
        assert not landed.exists()  # nothing above merged anything
        # The same origin may.
        r = c.post(merge, json={"into": "mtarget"}, headers={"origin": base})
        assert r.status_code == 200, r.text
    assert landed.read_text() == "merged\n"


def test_a_token_server_refuses_the_new_routes_without_its_token(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "token target", task_id="ttarget", lazy=True)
    token = web.load_token(svc.paths.home)
    assert token
    with running(svc, host="0.0.0.0", token=token) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/api/tasks/ttarget/subtasks").status_code == 401
        assert c.post("/api/tasks/ttarget/merge", json={"into": "main"}).status_code == 401
        assert c.post("/api/tasks", json={"repo": str(repo), "description": "x", "template": "t"}).status_code == 401
        auth = {"authorization": "Bearer " + "x" * len(token)}
        assert c.post("/api/tasks/ttarget/merge", json={"into": "main"}, headers=auth).status_code == 401
    assert [t.id for t in svc.list_tasks()] == ["ttarget"]


def test_live_output_cannot_drive_the_terminal_of_whoever_reads_the_history(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "terminal injection")
    # C1 controls encoded in UTF-8 (CSI, OSC ... ST: xterm and VTE obey them), a bidi
    # override and DEL: json.dumps(ensure_ascii=False) escapes none of them, only C0.
    script = ("printf 'x\\302\\2332J\\302\\23552;c;cHduZWQ=\\302\\234 \\342\\200\\256evil\\177\\n'; sleep 1.2; "
              "echo end")
    assert svc.exec(task.id, ["sh", "-c", script]).exit_code == 0
    assert any("\x9b" in p["text"] for p in _output_events(svc, task.id))  # it is in the log
    for args in (("task-history", task.id), ("task-history", task.id, "--json")):
        proc = run_cli(*args, env={"TASKBOX_HOME": str(svc.paths.home)})
        assert proc.returncode == 0, proc.stderr
        bad = sorted({hex(ord(ch)) for ch in proc.stdout
                      if (ord(ch) < 0x20 and ch not in "\n") or 0x7F <= ord(ch) <= 0x9F or ch == "\u202e"})
        assert not bad, f"{args}: control characters reach the terminal: {bad}"
        if "--json" in args:
            assert any("\x9b" in e["payload"].get("text", "") for e in json.loads(proc.stdout)["events"])
