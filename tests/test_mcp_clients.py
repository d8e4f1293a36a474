"""What real agent clients need from the MCP server: progress on long commands, cancellation
that stops the command, background jobs that outlive the server, and no container stopped
under running work. Driven by the SDK's own client over stdio against `taskbox mcp`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from taskbox import TaskService

from .test_mcp import call, call_error, stdio

pytestmark = pytest.mark.docker


def executions(svc: TaskService, task_id: str) -> list[dict[str, Any]]:
    return svc.executions(task_id, 100)


def events(svc: TaskService, task_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in svc.registry.events(task_id, limit=500) if e["type"] == kind]


def running(svc: TaskService, task_id: str) -> list[dict[str, Any]]:
    return svc.running_work(svc.get(task_id))


def wait_until(predicate: Any, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


async def make_task(client: Client, repo: Path, task_id: str) -> None:
    await call(client, "create_task_sandbox", task_id=task_id, task_description=f"client test {task_id}",
               workspace_path=str(repo))
    await call(client, "attach_agent_to_task", task_id=task_id, agent_name="opencode", agent_model="m",
               session_id=f"s-{task_id}")


def test_long_command_sends_progress_with_its_newest_output(svc: TaskService, repo: Path) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async def main() -> dict[str, Any]:
        async with stdio()() as client:
            await make_task(client, repo, "prog")
            res = await client.call_tool("execute_in_task", {
                "task_id": "prog", "command": "for i in 1 2 3 4 5 6; do echo line-$i; sleep 1; done"},
                progress_callback=on_progress)
            assert not res.is_error, res.content
            assert res.structured_content is not None
            return res.structured_content

    result = anyio.run(main)
    assert result["exit_code"] == 0 and result["stdout"].count("line-") == 6
    assert progress, "no progress notification while a 6-second command ran"
    values = [v for v, _ in progress]
    assert values == sorted(values) and len(set(values)) == len(values)  # progress only increases
    assert any(m and "line-" in m for _, m in progress), progress  # the newest output travels along


def test_cancelled_call_kills_the_command_and_logs_it(svc: TaskService, repo: Path) -> None:
    ws = Path(svc.paths.workspace("cancel"))

    async def main() -> None:
        async with stdio()() as client:
            await make_task(client, repo, "cancel")
            started = anyio.Event()

            async def on_progress(_value: float, _total: float | None, message: str | None) -> None:
                if message and "started" in message:
                    started.set()

            async with anyio.create_task_group() as tg:
                async def run() -> None:
                    await client.call_tool("execute_in_task", {
                        "task_id": "cancel",
                        "command": "echo started; sleep 8; touch /workspace/too-late; echo finished"},
                        progress_callback=on_progress)

                tg.start_soon(run)
                with anyio.fail_after(60):
                    await started.wait()
                assert running(svc, "cancel"), "the command should be running now"
                tg.cancel_scope.cancel()  # the SDK sends notifications/cancelled for the call
            # The server keeps serving on the same connection after a cancel.
            status = await call(client, "get_task_status", task_id="cancel")
            assert status["task_id"] == "cancel"

    anyio.run(main)
    assert wait_until(lambda: not running(svc, "cancel"), 10), running(svc, "cancel")
    assert wait_until(lambda: any(e.get("status") == "cancelled" for e in executions(svc, "cancel")), 10)
    [entry] = [e for e in executions(svc, "cancel") if e.get("status") == "cancelled"]
    assert entry["command"].startswith("echo started") and entry["stdout"] == "started\n"
    assert events(svc, "cancel", "exec.cancelled")
    time.sleep(10)  # past the moment the command would have written its file
    assert not (ws / "too-late").exists()


def test_dropped_connection_kills_the_running_command(svc: TaskService, repo: Path) -> None:
    async def setup() -> None:
        async with stdio()() as client:
            await make_task(client, repo, "drop")

    anyio.run(setup)
    proc = subprocess.Popen([sys.executable, "-m", "taskbox", "mcp"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))
    assert proc.stdin and proc.stdout

    def send(msg: dict[str, Any]) -> None:
        assert proc.stdin
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        proc.stdin.flush()

    send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
    assert json.loads(proc.stdout.readline())["id"] == 1
    send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute_in_task", "arguments": {
        "task_id": "drop", "command": "sleep 8; touch /workspace/too-late"}}})
    assert wait_until(lambda: bool(running(svc, "drop")), 30), "the command never started"
    proc.stdin.close()  # the client goes away mid-call
    proc.wait(60)
    assert not running(svc, "drop")
    assert any(e.get("status") == "cancelled" for e in executions(svc, "drop"))
    time.sleep(10)
    assert not (Path(svc.get("drop").workspace_path) / "too-late").exists()


def test_background_jobs_survive_the_server_and_block_stopping_the_task(svc: TaskService, repo: Path) -> None:
    ws = Path(svc.paths.workspace("jobs"))

    async def first() -> str:
        async with stdio()() as client:
            await make_task(client, repo, "jobs")
            started = await call(client, "execute_in_task", task_id="jobs", background=True,
                                 command="echo serving; for i in $(seq 1 300); do echo tick $i; sleep 0.2; done")
            assert started["status"] == "running" and started["job_id"].startswith("j-")
            return str(started["job_id"])

    job = anyio.run(first)  # that server process has exited now; the job lives in the container

    async def second() -> None:
        async with stdio()() as client:
            status = await call(client, "get_task_status", task_id="jobs")
            [row] = [j for j in status["jobs"] if j["job_id"] == job]
            assert row["status"] == "running" and "echo serving" in row["command"]
            out = await call(client, "read_task_job_output", task_id="jobs", job_id=job)
            assert out["output"].startswith("serving\n") and out["status"] == "running"
            more = await call(client, "read_task_job_output", task_id="jobs", job_id=job,
                              offset=out["next_offset"], max_bytes=7)
            assert len(more["output"].encode()) <= 7 and more["offset"] == out["next_offset"]

            # Nothing stops the container under a running job: each is refused, naming the job.
            for tool, args in (("complete_task", {}), ("detach_agent_from_task", {"session_id": "s-jobs"})):
                text = await call_error(client, tool, task_id="jobs", **args)
                assert job in text and "kill_running" in text, text
            assert svc.get("jobs").status.value == "active"

            waited = await call(client, "wait_for_task_job", task_id="jobs", job_id=job, timeout=1)
            assert waited["finished"] is False and "tick" in waited["output_tail"]
            killed = await call(client, "kill_task_job", task_id="jobs", job_id=job)
            assert killed["status"] == "killed" and killed["killed"] is True
            assert not running(svc, "jobs")

            short = await call(client, "execute_in_task", task_id="jobs", background=True,
                               command="echo out; echo err >&2; exit 3")
            done = await call(client, "wait_for_task_job", task_id="jobs", job_id=short["job_id"], timeout=60)
            assert done["finished"] and done["status"] == "exited" and done["exit_code"] == 3
            assert sorted(done["output_tail"].split()) == ["err", "out"]

            # kill_running: the job is killed first, then the task completes.
            last = await call(client, "execute_in_task", task_id="jobs", background=True,
                              command="sleep 6; touch /workspace/too-late")
            res = await call(client, "complete_task", task_id="jobs", kill_running=True)
            assert res["success"] and res["status"] == "completed"
            assert last["job_id"]

    anyio.run(second)
    assert events(svc, "jobs", "task.killed_running")
    assert any(e.get("job_id") == job and e.get("status") == "cancelled" for e in executions(svc, "jobs"))
    time.sleep(7)
    assert not (ws / "too-late").exists()


def test_a_running_command_blocks_pause_and_restore(svc: TaskService, repo: Path) -> None:
    from taskbox import TaskBusy

    task = svc.create_task(repo, "busy task")
    ckpt = svc.create_checkpoint(task.id, "start")
    job = svc.start_job(task.id, "sleep 60")
    with pytest.raises(TaskBusy) as err:
        svc.pause(task.id)
    assert job["job_id"] in err.value.message and err.value.details["running"][0]["kind"] == "job"
    with pytest.raises(TaskBusy):
        svc.restore_checkpoint(task.id, ckpt["checkpoint_id"])
    assert svc.get(task.id).status.value == "active"
    assert svc.pause(task.id, kill_running=True).status.value == "paused"
    r = subprocess.run([sys.executable, "-m", "taskbox", "show", task.id, "--json"], capture_output=True, text=True,
                       env=dict(os.environ), timeout=60)
    assert r.returncode == 0, r.stderr


def raw_initialize(version: str, env: dict[str, str]) -> dict[str, Any]:
    """`taskbox mcp`'s reply to an ``initialize`` with ``version``, read off its stdout."""
    proc = subprocess.Popen([sys.executable, "-m", "taskbox", "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env})
    assert proc.stdin and proc.stdout
    proc.stdin.write((json.dumps({"jsonrpc": "2.0", "id": 7, "method": "initialize", "params": {
        "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}) + "\n").encode())
    proc.stdin.flush()
    reply = json.loads(proc.stdout.readline())
    proc.stdin.close()
    assert proc.wait(60) == 0
    return dict(reply)


def test_fast_initialize_answers_exactly_as_the_sdk_does(home: Path) -> None:
    """`taskbox mcp` answers initialize before the SDK has loaded; the answer must be the SDK's own."""
    from taskbox.mcp_stdio import DIRECT_ENV, FAST_VERSIONS

    for version in (*FAST_VERSIONS, "2026-07-28", "1999-01-01"):
        fast = raw_initialize(version, {})
        direct = raw_initialize(version, {DIRECT_ENV: "1"})
        assert fast == direct, version
        assert fast["id"] == 7 and fast["result"]["serverInfo"]["name"] == "taskbox"


def test_errors_name_mcp_tools_and_every_call_is_counted(svc: TaskService, repo: Path) -> None:
    async def main() -> None:
        async with stdio()() as client:
            text = await call_error(client, "get_task_status", task_id="no-such-task")
            assert "list_active_tasks" in text and "taskbox list-tasks" not in text
            await make_task(client, repo, "counted")  # create and attach: 2 calls
            before = svc.state("counted")["metrics"]["tool_calls"]
            await call(client, "get_task_status", task_id="counted")
            await call(client, "write_task_file", task_id="counted", path="a.txt", content="a")
            await call(client, "read_task_file", task_id="counted", path="a.txt")
            await call(client, "execute_in_task", task_id="counted", command="true")
            await call_error(client, "read_task_file", task_id="counted", path="missing.txt")
            assert svc.state("counted")["metrics"]["tool_calls"] == before + 5

    anyio.run(main)
    r = subprocess.run([sys.executable, "-m", "taskbox", "list-tasks", "--status", "all", "--json"],
                       capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert r.returncode == 0, r.stderr
    assert [t["task_id"] for t in json.loads(r.stdout)] == ["counted"]
