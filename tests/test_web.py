"""`taskbox serve`: the REST API, the event WebSocket, MCP at /mcp, metrics and access control,
exercised with real HTTP and WebSocket clients against a server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from taskbox import web
from taskbox.errors import InvalidInput
from taskbox.service import TaskService

from .conftest import run_cli
from .test_mcp import stdio_params
from .webserver import running

pytestmark = pytest.mark.docker


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/api/events" + (f"?{query}" if query else "")


async def receive_events(url: str, count: int, *, timeout: float = 30, **kw: Any) -> list[dict[str, Any]]:
    """Connect, and collect ``count`` event messages (the hello is checked and left out)."""
    out: list[dict[str, Any]] = []
    async with websockets.connect(url, **kw) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert hello["kind"] == "hello"
        while len(out) < count:
            msg = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if msg["kind"] == "event":
                out.append(msg)
    return out


def metrics(client: httpx.Client) -> dict[str, list[Any]]:
    r = client.get("/metrics")
    assert r.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def sample(families: dict[str, list[Any]], name: str, family: str | None = None, **labels: str) -> float:
    for s in families[family or name]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def test_rest_api_maps_onto_the_service(svc: TaskService, repo: Path) -> None:
    with running(svc) as base, httpx.Client(base_url=base, timeout=120) as c:
        r = c.post("/api/tasks", json={"repo": str(repo), "description": "web api task", "agent": "web",
                                       "id": "webapi"})
        assert r.status_code == 200, r.text
        assert r.json()["task_id"] == "webapi" and r.json()["status"] == "active"
        assert [t["task_id"] for t in c.get("/api/tasks").json()["tasks"]] == ["webapi"]
        assert c.get("/api/tasks", params={"status": "completed"}).json()["tasks"] == []
        shown = c.get("/api/tasks/webapi").json()
        assert shown["branch"].startswith("web-unknown/") and shown["todos"] == []

        r = c.post("/api/tasks/webapi/exec", json={"command": "echo hi; echo changed > app.py; git commit -qam web"})
        assert r.status_code == 200 and r.json()["stdout"] == "hi\n" and r.json()["exit_code"] == 0
        assert c.get("/api/tasks/webapi/executions").json()["executions"][-1]["command"].startswith("echo hi")
        assert "app.py" in c.get("/api/tasks/webapi/diff").json()["diff"]
        assert c.get("/api/tasks/webapi/log").json()["commits"]
        assert "Goal" in c.get("/api/tasks/webapi/plan").json()["content"]

        r = c.post("/api/tasks/webapi/todos", json={"todos": [{"id": "t1", "text": "write tests"}]})
        assert r.json()["todos"][0]["text"] == "write tests"
        assert c.get("/api/tasks/webapi/todos").json()["todos"][0]["id"] == "t1"
        c.post("/api/tasks/webapi/decisions", json={"decision": "use starlette", "rationale": "the SDK has it"})
        assert any(d["decision"] == "use starlette" for d in c.get("/api/tasks/webapi/decisions").json()["decisions"])
        history = c.get("/api/tasks/webapi/history").json()
        assert {"task.created", "task.exec", "decision.logged"} <= {e["type"] for e in history["events"]}

        cp = c.post("/api/tasks/webapi/checkpoints", json={"name": "before"}).json()
        c.post("/api/tasks/webapi/exec", json={"command": "echo worse > app.py && touch extra.txt"})
        d = c.get("/api/tasks/webapi/checkpoints/diff", params={"a": cp["checkpoint_id"]}).json()
        assert {ch["path"] for ch in d["changes"]} >= {"app.py", "extra.txt"}
        r = c.post(f"/api/tasks/webapi/checkpoints/{cp['checkpoint_id']}/restore", json={})
        assert r.status_code == 200 and r.json()["files_removed"] == 1
        assert svc.read_file("webapi", "app.py") == b"changed\n"
        assert "before" in [x["name"] for x in c.get("/api/tasks/webapi/checkpoints").json()["checkpoints"]]

        job = c.post("/api/tasks/webapi/exec", json={"command": "echo from-job", "background": True}).json()
        assert any(j["job_id"] == job["job_id"] for j in c.get("/api/tasks/webapi/jobs").json()["jobs"])
        assert c.get("/api/tasks/webapi/events", params={"since": 0}).json()["events"][0]["type"] == "task.registering"
        newest = c.get("/api/tasks/webapi/events", params={"newest": 1, "limit": 2, "exclude": "job.started"}).json()
        everything = [e for e in svc.events("webapi", limit=10_000) if e["type"] != "job.started"]
        assert [e["id"] for e in newest["events"]] == [e["id"] for e in everything[-2:]]
        only = c.get("/api/tasks/webapi/events", params={"type": "task.exec,checkpoint.created"}).json()["events"]
        assert only and {e["type"] for e in only} == {"task.exec", "checkpoint.created"}

        # Errors: JSON bodies with the exception's status code, never a traceback.
        r = c.get("/api/tasks/nope")
        assert r.status_code == 404 and r.json()["error"] == "task_not_found"
        r = c.post("/api/tasks/webapi/exec", json={"command": ""})
        assert r.status_code == 400 and r.json()["error"] == "invalid_input"
        r = c.post("/api/tasks/webapi/exec", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not JSON" in r.json()["message"]
        r = c.post("/api/tasks", json={"repo": str(repo), "description": "x", "id": "webapi"})
        assert r.status_code == 409, r.text
        r = c.post("/api/tasks/webapi/checkpoints/zzz/restore", json={})
        assert r.status_code == 404 and "message" in r.json()
        assert c.get("/api/nothing").status_code == 404
        assert c.get("/api/tasks/webapi/subtasks").json()["total"] == 0
        r = c.post("/api/tasks/webapi/merge", json={})
        assert r.status_code == 400 and "no parent" in r.json()["message"]

        spec = c.get("/api/openapi.json").json()
        assert spec["openapi"].startswith("3.") and "/api/tasks/{task_id}/checkpoints/{checkpoint_id}/restore" in spec["paths"]
        assert {r.path for r in web.ROUTES} <= set(spec["paths"])

        fam = metrics(c)
        assert sample(fam, "taskbox_tasks", status="active") == 1
        assert sample(fam, "taskbox_exec_total", "taskbox_exec", outcome="ok") >= 2
        assert sample(fam, "taskbox_exec_duration_seconds_count", "taskbox_exec_duration_seconds") >= 2
        assert sample(fam, "taskbox_checkpoints_total", "taskbox_checkpoints") >= 1
        assert sample(fam, "taskbox_checkpoint_duration_seconds_count", "taskbox_checkpoint_duration_seconds") >= 1
        assert sample(fam, "taskbox_checkpoint_bytes_total", "taskbox_checkpoint_bytes") > 0
        assert sample(fam, "taskbox_checkpoint_restores_total", "taskbox_checkpoint_restores") == 1
        assert sample(fam, "taskbox_containers", state="running") == 1
        assert sample(fam, "taskbox_task_memory_pressure_level", task_id="webapi") == 0
        assert "taskbox_leases" in fam and "taskbox_egress_denied" in fam

        usage = c.get("/api/usage").json()["usage"]
        assert usage and usage[0]["task_id"] == "webapi" and usage[0]["memory_bytes"] > 0

        r = c.post("/api/tasks/webapi/complete", json={"summary": "done from the web", "kill_running": True})
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
        assert svc.get("webapi").status == "completed"
        assert sample(metrics(c), "taskbox_tasks", status="completed") == 1


def test_events_from_another_process_arrive_in_order_and_reconnect_misses_none(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "events task", task_id="evt", lazy=True)
    start = svc.last_event_id()
    with running(svc) as base:
        async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            async def cli_decisions(names: list[str]) -> None:
                for n in names:
                    proc = await asyncio.to_thread(run_cli, "task-decisions", task.id, "--add", n)
                    assert proc.returncode == 0, proc.stderr

            async with websockets.connect(ws_url(base, f"since={start}&task={task.id}")) as ws:
                assert json.loads(await ws.recv())["kind"] == "hello"
                writer = asyncio.create_task(cli_decisions(["one", "two", "three"]))
                first: list[dict[str, Any]] = []
                while len(first) < 3:
                    first.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                await writer
            # Disconnected: more events happen meanwhile; the reconnect asks from the last id seen.
            await cli_decisions(["four", "five"])
            rest = await receive_events(ws_url(base, f"since={first[-1]['id']}&task={task.id}&type=decision."), 2)
            return first, rest

        first, rest = asyncio.run(main())
    got = first + rest
    assert [m["payload"]["decision"] for m in got] == ["one", "two", "three", "four", "five"]
    ids = [m["id"] for m in got]
    assert ids == sorted(ids) and len(set(ids)) == 5
    logged = [e["id"] for e in svc.registry.events(task.id, after_id=start) if e["type"] == "decision.logged"]
    assert ids == logged


def test_twenty_clients_at_once_get_every_event_in_order(svc: TaskService, repo: Path) -> None:
    tasks = [svc.create_task(repo, f"fan out {i}", task_id=f"fan{i}", lazy=True) for i in range(3)]
    start = svc.last_event_id()
    with running(svc) as base:
        async def main() -> list[list[dict[str, Any]]]:
            clients = [asyncio.create_task(receive_events(ws_url(base, f"since={start}&type=decision.logged"), 15))
                       for _ in range(20)]
            await asyncio.sleep(0.5)
            for i in range(15):
                await asyncio.to_thread(svc.log_decision, tasks[i % 3].id, f"d{i}")
            return await asyncio.gather(*clients)

        results = asyncio.run(main())
    expected = [e["id"] for e in svc.registry.events(after_id=start) if e["type"] == "decision.logged"]
    assert len(expected) == 15
    for got in results:
        assert [m["id"] for m in got] == expected
        assert [m["payload"]["decision"] for m in got] == [f"d{i}" for i in range(15)]


def test_live_stream_without_since_starts_now_and_filters(svc: TaskService, repo: Path) -> None:
    a = svc.create_task(repo, "a task", task_id="fa", lazy=True)
    b = svc.create_task(repo, "b task", task_id="fb", lazy=True)
    svc.log_decision(a.id, "old")
    with running(svc) as base:
        async def main() -> list[dict[str, Any]]:
            recv = asyncio.create_task(receive_events(ws_url(base, f"task={b.id}"), 1))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(svc.log_decision, a.id, "not for this client")
            await asyncio.to_thread(svc.log_decision, b.id, "for this client")
            return await recv

        got = asyncio.run(main())
    assert [(m["task_id"], m["payload"]["decision"]) for m in got] == [("fb", "for this client")]


def test_mcp_is_served_at_slash_mcp(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "mcp over the web server", task_id="webmcp", lazy=True)
    with running(svc) as base:
        async def main() -> tuple[set[str], dict[str, Any]]:
            async with Client(base + "/mcp") as client:
                tools = {t.name for t in (await client.list_tools()).tools}
                res = await client.call_tool("list_active_tasks", {})
                return tools, res.structured_content or {}

        tools, listed = asyncio.run(main())
    assert {"create_task_sandbox", "execute_in_task", "restore_task_checkpoint"} <= tools
    assert "webmcp" in json.dumps(listed)


# --- access ------------------------------------------------------------------------------------------


def test_cross_origin_websocket_and_writes_are_refused(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "origin task", task_id="orig", lazy=True)
    with running(svc) as base, httpx.Client(base_url=base, timeout=30) as c:
        evil = {"origin": "http://evil.example"}
        r = c.post("/api/tasks/orig/abort", json={}, headers=evil)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        r = c.post("/api/tasks/orig/abort", json={}, headers={"sec-fetch-site": "cross-site"})
        assert r.status_code == 403
        # A cross-site form cannot send JSON: a text/plain or form body is refused.
        r = c.post("/api/tasks/orig/abort", content=b"reason=x",
                   headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400
        # DNS rebinding: a page of evil.example resolved to 127.0.0.1 names its own host.
        assert c.get("/api/tasks", headers={"host": "evil.example"}).status_code == 403
        assert svc.get("orig").status == "pending"

        async def ws_refused() -> int:
            with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
                async with websockets.connect(ws_url(base), origin="http://evil.example"):
                    pass
            return exc.value.response.status_code

        assert asyncio.run(ws_refused()) == 403
        # The same origin is welcome.
        r = c.post("/api/tasks/orig/abort", json={"reason": "same origin"}, headers={"origin": base})
        assert r.status_code == 200 and svc.get("orig").status == "aborted"
        page = c.get("/")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"


def test_non_loopback_needs_a_token(svc: TaskService, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="needs an access token"):
        web.create_app(svc, host="0.0.0.0", port=1)
    token = web.load_token(svc.paths.home)
    path = svc.paths.home / web.TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == token
    assert web.load_token(svc.paths.home) == token  # kept, not made anew
    with running(svc, host="0.0.0.0", token=token) as base, httpx.Client(base_url=base, timeout=30) as c:
        for path_ in ("/", "/api/tasks", "/metrics", "/static/app.js", "/api/openapi.json"):
            assert c.get(path_).status_code == 401, path_
        assert c.post("/mcp", json={}).status_code == 401
        assert c.get("/api/tasks", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/tasks", headers={"authorization": f"Bearer {token}"}).status_code == 200

        async def ws_status(**kw: Any) -> int:
            try:
                async with websockets.connect(ws_url(base), **kw) as ws:
                    await ws.recv()
                    return 101
            except websockets.exceptions.InvalidStatus as exc:
                return exc.response.status_code

        assert asyncio.run(ws_status()) == 401
        assert asyncio.run(ws_status(additional_headers={"authorization": f"Bearer {token}"})) == 101
        # The dashboard logs in once: the token becomes an HttpOnly cookie and leaves the URL.
        r = c.get("/", params={"token": token})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        page = c.get("/")
        assert page.status_code == 200 and token not in page.text
        assert c.get("/api/tasks").status_code == 200
        assert token not in c.get("/static/app.js").text


def test_watch_prints_the_task_table(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "watch me", task_id="watched", lazy=True)
    proc = run_cli("watch", "--once", env={"TASKBOX_HOME": str(svc.paths.home)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["TASK", "STATUS", "AGENT"]
    assert lines[1].split()[:2] == ["watched", "pending"]


def test_serve_refuses_a_bad_port_in_one_line(home: Path) -> None:
    proc = run_cli("serve", "--port", "70000", env={"TASKBOX_HOME": str(home)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_output_of_a_command_run_by_another_process_streams_live(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "stream from the cli", task_id="stream")
    secret = "tok-" + "k7Q2mZ9xV4pL8wR3"
    script = ("for i in 1 2 3 4 5 6; do echo line-$i $DEPLOY_TOKEN; sleep 0.4; done; "
              "echo '<img src=x onerror=alert(1)>' >&2; exit 3")
    with running(svc) as base:
        async def main() -> tuple[list[dict[str, Any]], bool]:
            async with websockets.connect(ws_url(base, "task=stream&type=exec.output,task.exec")) as ws:
                assert json.loads(await ws.recv())["kind"] == "hello"
                # The secret is known to the CLI process only (not to this server's redactor).
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "taskbox", "exec", "stream", "--secret", "DEPLOY_TOKEN", "--", "sh", "-c",
                    script, env={**os.environ, "TASKBOX_SECRET_DEPLOY_TOKEN": secret},
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                got: list[dict[str, Any]] = []
                live = False
                while not got or got[-1]["type"] != "task.exec":
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                    if "line-1" in str(got[-1]["payload"].get("text")) and proc.returncode is None:
                        live = True  # output arrived while the command still ran
                await proc.communicate()
                assert proc.returncode == 3
                return got, live

        got, live = asyncio.run(main())
    assert live
    assert secret not in json.dumps(got)
    out = [m for m in got if m["type"] == "exec.output"]
    assert got[-1]["type"] == "task.exec" and out[-1]["payload"]["done"] is True
    assert out[-1]["payload"]["exit_code"] == 3
    assert [m["payload"]["seq"] for m in out] == list(range(len(out)))
    assert len({m["payload"]["exec_id"] for m in out}) == 1
    stdout = "".join(m["payload"]["text"] for m in out if m["payload"]["stream"] == "stdout")
    assert stdout == "".join(f"line-{i} [REDACTED:DEPLOY_TOKEN]\n" for i in range(1, 7))
    stderr = "".join(m["payload"]["text"] for m in out if m["payload"]["stream"] == "stderr")
    assert stderr == "<img src=x onerror=alert(1)>\n"
    assert "--secret" not in out[0]["payload"]["command"] and "DEPLOY_TOKEN" in out[0]["payload"]["command"]
    # In the durable log too, for a client that comes later.
    logged = [e for e in svc.registry.events("stream") if e["type"] == "exec.output"]
    assert [e["id"] for e in logged] == [m["id"] for m in out]


def test_watch_is_live_in_a_terminal_and_stops_on_ctrl_c(svc: TaskService, repo: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: `taskbox watch` on a real terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "taskbox", "watch", "--interval", "1"], dict(os.environ))
    seen = bytearray()

    def read_until(text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never shown; the terminal has: {seen[-2000:]!r}"
            ready, _, _ = select.select([fd], [], [], min(left, 1))
            if ready:
                try:
                    seen.extend(os.read(fd, 65536))
                except OSError:  # EIO: the child closed the terminal
                    raise AssertionError(f"watch ended early: {seen[-2000:]!r}") from None

    try:
        read_until(b"no tasks")
        # A task created by another process appears without restarting watch.
        proc = run_cli("create-task", "watched live", "--repo", str(repo), "--id", "watchlive", "--lazy")
        assert proc.returncode == 0, proc.stderr
        read_until(b"watchlive")
        read_until(b"pending")
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline (SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen.extend(chunk)
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert b"Traceback" not in seen and b"KeyboardInterrupt" not in seen


def test_output_of_a_command_run_by_an_mcp_server_in_another_process_streams(svc: TaskService, repo: Path) -> None:
    svc.create_task(repo, "stream from mcp", task_id="mcpout")
    with running(svc) as base:
        async def main() -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
            async with websockets.connect(ws_url(base, "task=mcpout&type=exec.output")) as ws, \
                    Client(stdio_params()) as client:
                assert json.loads(await ws.recv())["kind"] == "hello"
                call = asyncio.create_task(client.call_tool("execute_in_task", {
                    "task_id": "mcpout", "command": "for i in 1 2 3 4 5; do echo mcp-line-$i; sleep 0.5; done"}))
                got: list[dict[str, Any]] = []
                live = False
                while not got or not got[-1]["payload"].get("done"):
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
                    live = live or ("mcp-line-1" in got[-1]["payload"]["text"] and not call.done())
                res = await call
                assert not res.is_error and res.structured_content is not None
                return got, res.structured_content, live

        got, result, live = asyncio.run(main())
    assert live  # the MCP call was still running when its first line reached the dashboard's stream
    assert "".join(m["payload"]["text"] for m in got) == "".join(f"mcp-line-{i}\n" for i in range(1, 6))
    assert result["stdout"] == "".join(f"mcp-line-{i}\n" for i in range(1, 6))
    assert got[-1]["payload"]["exit_code"] == 0
