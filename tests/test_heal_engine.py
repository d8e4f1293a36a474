"""Exec heals across a Docker engine killed (SIGKILL) and restarted mid-exec.

A private second engine is started for this (its own socket, data root, exec root, pidfile
and a bridge of its own made here), so the machine's shared engine is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskbox import TaskService, engine
from taskbox.errors import TaskboxError

from .conftest import IMAGE, release_volumes

BRIDGE = "tbxheal0"
SUBNET = "10.213.77.1/24"


class PrivateEngine:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen[bytes] | None = None
        # Its own containerd, as a service beside the engine (as on a real host): killing the
        # engine leaves it, and the engine started again finds its containers there.
        self.containerd_sock = root / "containerd.sock"
        self.containerd: subprocess.Popen[bytes] | None = None

    def start_containerd(self) -> None:
        config = self.root / "containerd.toml"
        config.write_text(f'version = 2\nroot = "{self.root}/containerd-root"\nstate = "{self.root}/containerd-state"\n'
                          f'[grpc]\n  address = "{self.containerd_sock}"\n[ttrpc]\n  address = "{self.containerd_sock}.ttrpc"\n'
                          '[debug]\n  address = ""\n[metrics]\n  address = ""\n')
        log = open(self.root / "containerd.log", "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.containerd = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log,
                                           start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.containerd_sock.exists():
            assert time.monotonic() < deadline and self.containerd.poll() is None, \
                (self.root / "containerd.log").read_text()[-2000:]
            time.sleep(0.1)

    def start(self) -> None:
        log = open(self.root / "dockerd.log", "ab")  # noqa: SIM115 - kept open for the daemon's life
        self.proc = subprocess.Popen(
            ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
             "--containerd", str(self.containerd_sock), "--containerd-namespace", "tbxheal",
             "--containerd-plugins-namespace", "tbxheal-plugins",
             "--bridge", BRIDGE, "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run(["docker", "-H", self.host, "info"], capture_output=True).returncode == 0:
                return
            assert self.proc.poll() is None, (self.root / "dockerd.log").read_text()[-2000:]
            time.sleep(0.3)
        raise AssertionError("the private engine did not start: " + (self.root / "dockerd.log").read_text()[-2000:])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # this engine's process only, by its own pid
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(30)
        # Our containerd, and the shims of containers it still ran (children of ours only).
        if self.containerd is not None:
            shims = subprocess.run(["pgrep", "-f", f"containerd-shim.*-address {self.containerd_sock}"],
                                   capture_output=True, text=True).stdout.split()
            self.containerd.send_signal(signal.SIGTERM)
            try:
                self.containerd.wait(30)
            except subprocess.TimeoutExpired:
                self.containerd.send_signal(signal.SIGKILL)
                self.containerd.wait(30)
            # The shims' containers' processes too: killing a shim alone would leave them to init.
            for pid in [*descendants({int(p) for p in shims}), *map(int, shims)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def descendants(roots: set[int]) -> list[int]:
    """Every process below ``roots`` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def private_engine() -> Iterator[PrivateEngine]:
    root = Path(tempfile.mkdtemp(prefix="tbxd-", dir="/tmp"))  # short: a socket path has a length limit
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    eng = PrivateEngine(root)
    try:
        subprocess.run(["ip", "addr", "add", SUBNET, "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        eng.start_containerd()
        eng.start()
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        subprocess.run(["docker", "-H", eng.host, "load", "-q"], stdin=save.stdout, check=True, capture_output=True)
        assert save.wait() == 0
        yield eng
    finally:
        eng.stop()
        time.sleep(1)
        subprocess.run(["sh", "-c", f"grep -o ' {root}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l"],
                       check=False)
        subprocess.run(["ip", "link", "del", BRIDGE], check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def private_svc(private_engine: PrivateEngine, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskService]:
    monkeypatch.setenv("DOCKER_HOST", private_engine.host)
    engine.reset()
    try:
        yield TaskService(home)
    finally:
        release_volumes(home)  # its containers on the private engine go first
        monkeypatch.delenv("DOCKER_HOST")
        engine.reset()  # the shared engine again for the tests after this one


def test_exec_heals_after_the_engine_is_killed_and_restarted_mid_exec(
        private_engine: PrivateEngine, private_svc: TaskService, repo: Path) -> None:
    svc = private_svc
    # The docker exec path: through the exec agent the command outlives the engine and its
    # whole, true result comes back (nothing is cut), so this case needs `docker exec`.
    svc.sandbox.agent_home = None
    task = svc.create_task(repo, "engine restart")
    assert svc.exec(task.id, "echo first").stdout == "first\n"
    outcome: dict[str, object] = {}

    def long_exec() -> None:
        try:
            outcome["result"] = svc.exec(task.id, "echo started; sleep 6; echo finished")
        except TaskboxError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=long_exec)
    worker.start()
    time.sleep(1.5)
    private_engine.kill()
    worker.join(120)
    assert not worker.is_alive()
    # The cut command is an error, or a result flagged incomplete: never a clean run.
    if "result" in outcome:
        res = outcome["result"]
        assert res.output_incomplete or res.exit_code != 0, res
    else:
        err = outcome["error"]
        assert isinstance(err, TaskboxError) and "\n" not in err.message
    # Down: one line saying so.
    with pytest.raises(TaskboxError) as down:
        svc.exec(task.id, "echo nobody home")
    assert "\n" not in down.value.message
    private_engine.start()
    res = svc.exec(task.id, "echo back; cat /workspace/.task-memory/state.json >/dev/null && echo memory")
    assert res.exit_code == 0 and res.stdout == "back\nmemory\n" and not res.output_incomplete
    healed = [e for e in svc.registry.events(task.id) if e["type"] == "container.healed"]
    assert healed and healed[-1]["payload"]["by"] == "exec"
    assert svc.exec(task.id, "echo again").stdout == "again\n"  # no heal needed now
    assert len([e for e in svc.registry.events(task.id) if e["type"] == "container.healed"]) == len(healed)
