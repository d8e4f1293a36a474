"""Checkpoint faults: a restore killed half-way (real SIGKILL), hostile archives, Docker down."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from taskbox import DockerUnavailable, InvalidInput, TaskboxError, TaskService, engine
from taskbox.workspace import hand_over

from .conftest import run_cli
from .test_checkpoints import differences, manifest


def _half_restored(svc: TaskService, repo: Path) -> tuple[str, str, dict, dict]:
    """A task whose restore to checkpoint A was killed after the files, before .git."""
    task = svc.create_task(repo, "crash mid restore")
    ws = Path(task.workspace_path)
    svc.exec(task.id, "mkdir keep && echo A > keep/a.txt && git add -A && git commit -qm A")
    hand_over(ws)
    a = svc.create_checkpoint(task.id, "A")
    want = manifest(ws)
    svc.exec(task.id, "echo B > keep/a.txt && echo new > b.txt && mkdir empty-b && git add -A && git commit -qm B")
    before = manifest(ws)
    r = run_cli("restore-checkpoint", task.id, "-c", a["checkpoint_id"], env={"TASKBOX_CRASH_AT": "restore.midway"})
    assert r.returncode == -9, r.stderr  # really killed
    return task.id, a["checkpoint_id"], want, before


def test_crash_mid_restore_is_reported_and_finished_by_doctor(svc: TaskService, repo: Path) -> None:
    tid, cp, want, before = _half_restored(svc, repo)
    ws = Path(svc.get(tid).workspace_path)
    mixed = manifest(ws)
    assert differences(mixed, want) and differences(mixed, before)  # neither old nor new: a mix
    assert (ws / "keep" / "a.txt").read_text() == "A\n"  # files restored, .git not yet
    kinds = {f["kind"] for f in svc.doctor() if f["task_id"] == tid}
    assert "interrupted-restore" in kinds
    assert "paused-container" in kinds  # the crash left the container frozen, and that is said too
    findings = json.loads(run_cli("doctor", "--fix", "--json").stdout)
    fixed = [f for f in findings if f["kind"] == "interrupted-restore"]
    assert fixed and fixed[0]["fixed"] and cp in fixed[0]["action"]
    assert differences(manifest(ws), want) == []
    # (a new task's memory lives off its branch, so the branch starts with the user's own commits)
    assert svc.exec(tid, "git log --format=%s").stdout == "A\ninitial\n"
    assert [f for f in svc.doctor() if f["task_id"] == tid] == []


def test_the_next_checkpoint_operation_finishes_an_interrupted_restore(svc: TaskService, repo: Path) -> None:
    tid, _cp, want, _before = _half_restored(svc, repo)
    ws = Path(svc.get(tid).workspace_path)
    c = svc.create_checkpoint(tid, "after-crash")  # finishes the restore first, then snapshots
    assert differences(manifest(ws), want) == ["Plan.md"]  # the new checkpoint's own line in the log
    assert c["files"] > 0
    assert "checkpoint.restore_finished" in [e["type"] for e in svc.registry.events(tid)]
    assert svc.exec(tid, "cat keep/a.txt").stdout == "A\n"  # the container runs again


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        body = json.dumps({"format": 1, "name": "evil"}).encode()
        ti = tarfile.TarInfo("checkpoint.json")
        ti.size = len(body)
        tar.addfile(ti, io.BytesIO(body))
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o644
    return ti


@pytest.mark.parametrize("members, why", [
    ([(_member("workspace/../../escaped.txt"), b"x")], "climbs out"),
    ([(_member("/tmp/absolute.txt"), b"x")], "absolute"),
    ([(_member("workspace/etc", tarfile.SYMTYPE, "/etc"), None)], "link pointing out"),
    ([(_member("workspace/up", tarfile.SYMTYPE, "../../outside"), None)], "link pointing out"),
    ([(_member("workspace/sub", tarfile.DIRTYPE), None),
      (_member("workspace/inner", tarfile.SYMTYPE, "sub"), None),
      (_member("workspace/inner/file.txt"), b"through the link")], "passes through a link"),
    ([(_member("workspace/f"), b"file"), (_member("workspace/f/g"), b"under a file")], "passes through a file"),
    ([(_member("workspace/a"), b"x"), (_member("workspace/h", tarfile.LNKTYPE, "workspace/a"), None)], "hard link"),
    ([(_member("workspace/dev", tarfile.CHRTYPE), None)], "device"),
    ([(_member("workspace/pipe", tarfile.FIFOTYPE), None)], "device, fifo"),
    ([(_member("elsewhere/x.txt"), b"x")], "not under workspace/"),
    ([(_member("workspace/a"), b"1"), (_member("workspace/a"), b"2")], "twice"),
])
def test_hostile_archives_are_refused(svc: TaskService, repo: Path, tmp_path: Path, members, why) -> None:
    task = svc.create_task(repo, "import target", lazy=True)
    path = _archive(tmp_path / "evil.tar.gz", members)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(InvalidInput, match=why):
            svc.import_checkpoint(task.id, path)
    finally:
        os.chdir(cwd)
    assert svc.list_checkpoints(task.id) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar.gz", "home", "repo"]
    assert not Path("/tmp/absolute.txt").exists()


def test_not_an_archive(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    task = svc.create_task(repo, "import junk", lazy=True)
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(InvalidInput, match="not a readable"):
        svc.import_checkpoint(task.id, tmp_path / "junk.tar.gz")
    r = run_cli("checkpoint", "import", task.id, str(tmp_path / "missing.tar.gz"))
    assert r.returncode == 3 and "no file" in r.stderr


def test_a_disk_that_fills_mid_checkpoint(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "disk full", lazy=True)
    ws = Path(task.workspace_path)
    (ws / "small.txt").write_text("fits\n")
    good = svc.create_checkpoint(task.id, "good")
    store = svc.checkpoints.store(task.id).path
    full = store.parent / "full"
    full.mkdir()
    # the store moves onto a 4 MB file system, then an 8 MB file is checkpointed
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{store}/.", str(full)], check=True)
        os.rename(store, store.with_name("moved.git"))
        os.symlink(full, store)
        (ws / "big.bin").write_bytes(os.urandom(8 * 2**20))
        with pytest.raises(TaskboxError, match="(?i)no space left on device") as err:
            svc.create_checkpoint(task.id, "too-big")
        assert "into the checkpoint store" in err.value.message
        assert [c["name"] for c in svc.list_checkpoints(task.id)] == ["good"]
        assert svc.state(task.id)["current_checkpoint"] == good["checkpoint_id"]
        assert "Checkpoint `too-big`" in (ws / ".task-memory" / "decisions.md").read_text()
        assert "failed" in (ws / ".task-memory" / "decisions.md").read_text().split("too-big")[-1]
        # with room again, the same checkpoint works and restores
        (ws / "big.bin").unlink()
        (ws / "small.txt").write_text("changed\n")
        svc.restore_checkpoint(task.id, "good")
        assert (ws / "small.txt").read_text() == "fits\n"
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_docker_down_restoring_a_container_checkpoint_is_docker_unavailable(
        svc: TaskService, repo: Path, docker_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine gone (a socket nobody listens on): exit 5 and nothing touched, not "checkpoint corrupted"."""
    task = svc.create_task(repo, "docker down restore")
    ws = Path(task.workspace_path)
    svc.exec(task.id, "echo installed > /home/agent/.marker && echo one > f.txt")
    cp = svc.create_checkpoint(task.id, "with-fs", include_filesystem=True)
    try:
        svc.exec(task.id, "echo two > f.txt && echo extra > g.txt")
        before = manifest(ws)
        dead = "unix:///nonexistent/docker.sock"
        r = run_cli("restore-checkpoint", task.id, "-c", cp["checkpoint_id"], env={"DOCKER_HOST": dead})
        assert r.returncode == 5, (r.stdout, r.stderr)
        assert "Docker engine" in r.stderr and "corrupt" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        monkeypatch.setenv("DOCKER_HOST", dead)
        engine.reset()  # the next connection goes to the dead socket
        try:
            with pytest.raises(DockerUnavailable):
                TaskService(svc.paths.home).restore_checkpoint(task.id, cp["checkpoint_id"])
        finally:
            monkeypatch.undo()
            engine.reset()
        assert manifest(ws) == before  # all of the restore or none
        events = [e["type"] for e in svc.registry.events(task.id)]
        assert "checkpoint.restored" not in events
        # The engine back, the same checkpoint restores: it was never damaged.
        res = svc.restore_checkpoint(task.id, cp["checkpoint_id"])
        assert res["container_restored"]
        assert svc.exec(task.id, "cat /home/agent/.marker f.txt; ls g.txt 2>&1 || true").stdout.startswith(
            "installed\none\n")
    finally:
        for c in docker_engine.api.containers(all=True, filters={"ancestor": cp["image"]}):
            docker_engine.api.remove_container(c["Id"], force=True)
        svc.delete_checkpoint(task.id, cp["checkpoint_id"])
