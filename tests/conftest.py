"""Shared fixtures. Tests run against the real Docker engine and real git.

There is deliberately no skip when Docker is missing: the `docker_engine` fixture fails,
so a CI machine without an engine fails loudly instead of passing vacuously.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskbox import TaskService, engine, quota
from taskbox.config import Paths
from taskbox.sandbox import LABEL_HOME

IMAGE = os.environ.get("TASKBOX_TEST_IMAGE", "taskbox-sandbox:latest")
# Every event recorded in a test must be in the catalogue (taskbox.events), fields included;
# subprocesses (the CLI, MCP servers) inherit it.
os.environ["TASKBOX_STRICT_EVENTS"] = "1"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


@pytest.fixture(scope="session")
def docker_engine():
    client = engine.connect()  # raises DockerUnavailable: the test errors, it is never skipped
    client.images.get(IMAGE)  # the image must be built (scripts/test builds it)
    return client


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    h = tmp_path / "home"
    monkeypatch.setenv("TASKBOX_HOME", str(h))
    monkeypatch.setenv("TASKBOX_IMAGE", IMAGE)
    yield h
    release_volumes(h)


def release_volumes(home: Path) -> None:
    """Unmount and delete every workspace volume under ``home``, whatever the test left behind.

    Containers go first (a container keeps its volume's loop device attached); then each
    volume is released, so no mount and no loop device outlives the test, and the
    directories under the mount points are removable again.
    """
    paths = Paths(home.resolve())
    if not paths.volumes.is_dir() and not paths.workspaces.is_dir():
        return
    label = hashlib.sha256(str(paths.home).encode()).hexdigest()[:16]
    try:
        client = engine.connect()
        for c in client.api.containers(all=True, filters={"label": f"{LABEL_HOME}={label}"}):
            client.api.remove_container(c["Id"], force=True)
    except Exception:  # noqa: BLE001 - no engine: there are no containers to remove either
        pass
    quota.release_all(paths.volumes, paths.workspaces)
    leaked = [m.mountpoint for m in quota.mounts() if m.mountpoint.startswith(f"{paths.home}/")]
    assert not leaked, f"mounts left under {paths.home}: {leaked}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "README.md").write_text("# demo\n")
    (r / "app.py").write_text("print('hello')\n")
    git(r, "add", ".")
    git(r, "commit", "-qm", "initial")
    return r


@pytest.fixture
def svc(home: Path, docker_engine) -> Iterator[TaskService]:
    service = TaskService(home)
    yield service
    for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        docker_engine.api.remove_container(c["Id"], force=True)
    # a task's egress network too: the engine has room for about 30 networks in all
    for n in docker_engine.api.networks(filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        docker_engine.api.remove_network(n["Id"])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `taskbox` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "taskbox", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def file_holds(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the file holds ``needle``: read in chunks, over its data only (a workspace
    volume under TASKBOX_HOME is a sparse file of many GiB, mostly holes)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        pos, tail = 0, b""
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole past pos
                return False
            end = os.lseek(fd, start, os.SEEK_HOLE)
            if start != pos:
                tail = b""
            while start < end:
                data = os.pread(fd, min(chunk, end - start), start)
                if not data:
                    break
                if needle in tail + data:
                    return True
                tail = data[-(len(needle) - 1):] if len(needle) > 1 else b""
                start += len(data)
            pos = end
        return False
    finally:
        os.close(fd)
