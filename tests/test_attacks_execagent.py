"""Adversarial tests of the exec agent: the sandboxed code kills it and puts an impostor on its
socket (one that lies, floods, falls silent or speaks garbage) or swaps the socket for a link
to a host socket. The host must stay bounded and correct: it refuses what it cannot verify,
runs the command with ``docker exec`` instead, and its timeouts still kill the process tree."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from taskbox import TaskService, execagent
from taskbox.errors import CommandTimeout

# An impostor agent: kills the real one, binds the socket and misbehaves as told. With a key
# (a test of the host's bounds if authentication were ever bypassed) it signs its frames.
IMPOSTOR = r'''
import hashlib, hmac, json, os, signal, socket, struct, sys, time
if "TASKBOX_EXEC" in os.environ:  # shed the command's mark, so the host's kill sweep misses it
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {k: v for k, v in os.environ.items() if k != "TASKBOX_EXEC"})
mode, key = sys.argv[1], bytes.fromhex(sys.argv[2]) if len(sys.argv) > 2 else os.urandom(32)
for p in os.listdir("/proc"):
    try:
        if p.isdigit() and b"exec-agent" in open(f"/proc/{p}/cmdline", "rb").read():
            os.kill(int(p), signal.SIGKILL)
    except OSError:
        pass
path = "/run/taskbox/agent.sock"
try:
    os.unlink(path)
except FileNotFoundError:
    pass
if mode == "link":
    os.symlink("/var/run/docker.sock", path)
    sys.exit(0)
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(16)
if os.fork():
    os._exit(0)
os.setsid()
for fd in (0, 1, 2):
    os.dup2(os.open(os.devnull, os.O_RDWR), fd)
def frame(ctx, n, kind, data):
    head = kind + struct.pack(">I", len(data))
    return head + data + hmac.new(key, ctx + struct.pack(">Q", n) + head + data, "sha256").digest()[:16]
while True:
    c, _ = s.accept()
    if os.fork():
        c.close(); continue
    try:
        size = struct.unpack(">I", c.recv(4))[0]
        req = b""
        while len(req) < size:
            req += c.recv(size - len(req))
        ctx = hashlib.sha256(req).digest()
        if mode == "silent":
            c.sendall(frame(ctx, 0, b"A", b"")); c.recv(1)
            time.sleep(3600)
        elif mode == "garbage":
            c.sendall(os.urandom(1 << 16) * 4)
        elif mode == "lie":
            c.sendall(frame(ctx, 0, b"A", b"")); c.recv(1)
            c.sendall(frame(ctx, 1, b"O", b"all tests passed\n") + frame(ctx, 2, b"X", b'{"code": 0}'))
        elif mode == "flood":
            c.sendall(frame(ctx, 0, b"A", b"")); c.recv(1)
            n = 1
            while True:
                c.sendall(frame(ctx, n, b"O", b"x" * 65536)); n += 1
        elif mode == "huge":
            c.sendall(frame(ctx, 0, b"A", b"")); c.recv(1)
            c.sendall(b"O" + struct.pack(">I", 1 << 31))
    finally:
        os._exit(0)
'''


@pytest.fixture
def task(svc: TaskService, repo: Path):
    return svc.create_task(repo, "agent attacker")


# The runner of a command: the parent of the end-marker wrapper (above ``timeout``).
RUNNER = "q=$(ps -o ppid= -p $PPID); q=$(ps -o ppid= -p $q); ps -o args= -p $q; "


def plant(svc: TaskService, task, mode: str, key: bytes | None = None) -> None:
    (Path(task.workspace_path) / ".impostor.py").write_text(IMPOSTOR)
    args = f"{mode} {key.hex()}" if key else mode
    r = svc.exec(task.id, f"python3 /workspace/.impostor.py {args}; sleep 0.3")
    # The planting command ran through the agent it killed: its answer is cut, and said to be.
    assert r.output_incomplete and "went away" in r.stderr


def test_commands_run_through_the_agent(svc: TaskService, task) -> None:
    assert svc.sandbox.agent_keys is not None and svc.sandbox.agent_keys.load(task.container_id)
    r = svc.exec(task.id, RUNNER + "echo out; echo err >&2; exit 7")
    assert "exec-agent" in r.stdout  # the wrapper's parent is the agent, not a docker exec
    assert r.exit_code == 7 and r.stdout.endswith("out\n") and r.stderr == "err\n"
    assert not r.output_incomplete


@pytest.mark.parametrize("mode", ["lie", "silent", "garbage", "flood", "huge"])
def test_an_impostor_agent_is_refused_and_docker_exec_runs_the_command(svc: TaskService, task, mode: str) -> None:
    plant(svc, task, mode)
    r = svc.exec(task.id, RUNNER + "echo real; exit 3", timeout=30)
    assert r.exit_code == 3  # the impostor's "exit 0" never counts
    assert "real" in r.stdout and "all tests passed" not in r.stdout
    assert "exec-agent" not in r.stdout  # the command ran under docker exec
    assert not r.output_incomplete


def test_a_socket_swapped_for_a_link_to_a_host_socket_is_not_followed(svc: TaskService, task) -> None:
    plant(svc, task, "link")
    assert "docker.sock" in svc.exec(task.id, "ls -l /run/taskbox").stdout
    run_dir, _key = svc.sandbox.agent_keys.load(task.container_id)  # type: ignore[union-attr,misc]
    with pytest.raises(execagent.AgentUnavailable, match="not a socket"):
        execagent.connect(run_dir)
    r = svc.exec(task.id, "echo still; exit 4")
    assert r.exit_code == 4 and r.stdout == "still\n"


def test_timeouts_kill_the_process_tree_through_the_agent(svc: TaskService, task) -> None:
    with pytest.raises(CommandTimeout):
        svc.exec(task.id, "setsid sh -c 'sleep 301' & sleep 302", timeout=2)
    time.sleep(0.5)
    left = svc.exec(task.id, "ps -eo args | grep -c '^sleep 30[12]' || true").stdout.strip()
    assert left == "0"


@pytest.mark.parametrize("mode", ["flood", "silent"])
def test_the_host_stays_bounded_even_with_the_key(svc: TaskService, task, mode: str) -> None:
    """Defence in depth: an impostor that somehow had the key still cannot hold the host past
    its deadline or make it keep more than it counts."""
    run_dir, key = svc.sandbox.agent_keys.load(task.container_id)  # type: ignore[union-attr,misc]
    plant(svc, task, mode, key)
    seen = [0]

    def count(_kind: bytes, data: bytes) -> None:
        seen[0] += len(data)

    with pytest.raises(execagent.AgentBroken, match="in time"):
        execagent.run(run_dir, key, ["true"], cwd="/workspace", env={}, deadline=time.monotonic() + 2,
                      on_output=count)
    if mode == "silent":
        assert seen[0] == 0
