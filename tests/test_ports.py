"""Published ports: host loopback by default, added and removed while the task runs, kept across pause."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from taskbox import InvalidInput, NotFound, TaskService

from .conftest import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=3) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_publish_at_create_and_at_runtime(svc: TaskService, repo: Path) -> None:
    hp = _free_port()
    task = svc.create_task(repo, "serve", publish=[f"{hp}:8000"])  # network none: still reachable from the host
    svc.write_file(task.id, "hello.txt", b"hi from the sandbox\n")
    svc.start_job(task.id, "python3 -m http.server 8000")
    assert _get(hp) == "hi from the sandbox\n"
    assert svc.status(task.id)["ports"] == [{"port": 8000, "host_ip": "127.0.0.1", "host_port": hp}]
    # added while it runs, then removed
    hp2 = _free_port()
    svc.start_job(task.id, "python3 -m http.server 9000")
    out = svc.ports(task.id, "add", f"{hp2}:9000")
    assert out["warnings"] == [] and {p["port"] for p in out["ports"]} == {8000, 9000}
    assert _get(hp2) == "hi from the sandbox\n"
    svc.ports(task.id, "rm", "9000")
    with pytest.raises(OSError):
        _get(hp2, timeout=1)
    # kept across pause and resume
    svc.pause(task.id, kill_running=True)
    svc.ensure_running(task.id)
    svc.start_job(task.id, "python3 -m http.server 8000")
    assert _get(hp) == "hi from the sandbox\n"
    assert [p["running"] for p in svc.ports(task.id)["ports"]] == [True]
    # shown by `show`
    assert f"127.0.0.1:{hp} -> 8000" in run_cli("show", task.id).stdout


def test_port_bad_input(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "ports bad")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run_cli("ports", task.id, "add", f"{port}:8000")
        assert r.returncode == 2 and r.stderr.strip() == (
            f"error: host port 127.0.0.1:{port} is already in use; choose another with HOST_PORT:8000")
    assert svc.ports(task.id)["ports"] == [] and svc.get(task.id).status.value == "active"
    for bad in ("x", "0", "70000", "1.2.3:80:80"):
        with pytest.raises(InvalidInput):
            svc.ports(task.id, "add", bad)
    with pytest.raises(NotFound):
        svc.ports(task.id, "rm", "1234")
    hp = _free_port()
    out = svc.ports(task.id, "add", f"0.0.0.0:{hp}:8000")  # another address only explicitly, with a warning
    assert "reachable from other machines" in out["warnings"][0]
