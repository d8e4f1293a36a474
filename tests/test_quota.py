"""Disk and inode quotas of task workspaces, on real loop-mounted ext4 volumes and real Docker.

Every test's volumes are released by the `home` fixture (tests/conftest.py), which also
fails the test if any mount under its TASKBOX_HOME is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taskbox import InvalidInput, PolicyDenied, Status, TaskService, WorkspaceFull, hookimpl, quota
from taskbox.plugins import make_manager

from .conftest import run_cli

MIB = 1024**2
SMALL = {"disk": "64m", "inodes": 2000}


def volume(svc: TaskService, task_id: str) -> tuple[Path, Path]:
    """The task's image and workspace (mount point)."""
    return svc.paths.volume(task_id), svc.paths.workspace(task_id)


def near(inodes: int, asked: int) -> bool:
    """ext4 rounds an inode count to fill whole inode tables: a little more or less than asked."""
    return abs(inodes - asked) <= asked * 0.02


def assert_released(svc: TaskService, task_id: str) -> None:
    image, ws = volume(svc, task_id)
    assert not image.exists()
    assert quota.mount_at(ws) is None
    assert quota.loop_devices(image) == []
    assert not ws.exists()


def test_workspace_is_its_own_filesystem(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "quota layout", **SMALL)
    image, ws = volume(svc, task.id)
    assert task.metadata["quota"] == {"disk": 64 * MIB, "inodes": 2000}
    assert quota.is_mounted(image, ws)
    mount = quota.mount_at(ws)
    assert mount is not None and mount.fstype == "ext4" and mount.backing_file == str(image)
    assert len(quota.loop_devices(image)) == 1
    # outside the workspace, private to the host; the checkout and memory are on the volume
    assert image.parent == svc.paths.home / "volumes" and oct(image.stat().st_mode & 0o777) == "0o600"
    assert (ws / "README.md").read_text() == "# demo\n" and (ws / ".task-memory" / "state.json").exists()
    assert not (ws / "lost+found").exists()
    options = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4] == str(ws)).split()[5].split(",")
    assert {"nosuid", "nodev"} <= set(options)
    # the container sees the volume, owned by the sandbox user
    res = svc.exec(task.id, "stat -c '%u' . && df -k . | tail -1 && id -u")
    owner, df, uid = res.stdout.splitlines()
    assert owner == uid and int(df.split()[1]) < 64 * 1024
    # the sparse image takes on the host only what is written (not 64 MiB)
    assert image.stat().st_blocks * 512 < 16 * MIB


def test_filling_the_disk_is_enospc_inside(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "fill the disk", **SMALL)
    image, ws = volume(svc, task.id)
    res = svc.exec(task.id, "dd if=/dev/zero of=big bs=1M count=100")
    assert res.exit_code != 0 and "No space left on device" in res.stderr
    written = (ws / "big").stat().st_size
    assert 40 * MIB < written < 64 * MIB
    # the host holds the image, never more than its size
    assert image.stat().st_blocks * 512 <= 64 * MIB
    usage = svc.workspace_usage(svc.get(task.id))
    assert usage is not None and usage["bytes_used"] > 0.9 * usage["bytes_limit"]
    assert usage["bytes_available"] < 2 * MIB
    # root's small reserve keeps taskbox's bookkeeping working on a disk the agent filled
    svc.update_todos(task.id, [{"text": "recorded although the disk is full"}])
    assert svc.state(task.id)["todos"][-1]["text"] == "recorded although the disk is full"
    # a large host-side write does not fit: one clear error, no traceback
    with pytest.raises(WorkspaceFull, match="no space left in the task workspace"):
        svc.write_file(task.id, "notes.txt", b"x" * (8 * MIB))
    r = run_cli("exec", task.id, "--", "rm", "big")
    assert r.returncode == 0, r.stderr
    svc.write_file(task.id, "notes.txt", b"room again\n")
    assert svc.exec(task.id, "cat notes.txt").stdout == "room again\n"


def test_creating_many_files_hits_the_inode_quota(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "many files", **SMALL)
    res = svc.exec(task.id, "mkdir many && cd many && seq 1 3000 | xargs touch; ls | wc -l")
    assert "No space left on device" in res.stderr
    made = int(res.stdout.split()[-1])
    assert 1000 < made < 2000
    usage = svc.workspace_usage(svc.get(task.id))
    # ext4 rounds the inode count to whole inode tables: 1984 here
    assert usage is not None and usage["inodes_used"] == usage["inodes_limit"] and near(usage["inodes_limit"], 2000)
    # space is left, inodes are not: a new file fails, appending to one works
    assert usage["bytes_limit"] - usage["bytes_used"] > 32 * MIB
    res = svc.exec(task.id, "touch one-more; echo more >> README.md && tail -1 README.md")
    assert "No space left on device" in res.stderr and res.stdout == "more\n"
    # no inode for a new state.json: the pause still takes effect, the refusal is recorded
    assert svc.pause(task.id).status is Status.PAUSED
    assert any(e["type"] == "memory.refused" for e in svc.registry.events(task.id))
    with pytest.raises(WorkspaceFull):
        svc.write_file(task.id, "new.txt", b"x")


def test_show_and_status_report_usage(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "usage report", **SMALL)
    svc.exec(task.id, "head -c 10485760 /dev/zero > ten.bin && mkdir d && touch d/a d/b d/c")
    r = run_cli("show", task.id, "--json")
    assert r.returncode == 0, r.stderr
    usage = json.loads(r.stdout)["workspace_usage"]
    assert usage["mounted"] is True and usage["quota_bytes"] == 64 * MIB and usage["quota_inodes"] == 2000
    assert 10 * MIB <= usage["bytes_used"] < 20 * MIB
    assert 56 * MIB < usage["bytes_limit"] <= 64 * MIB
    assert 15 < usage["inodes_used"] < 200 and near(usage["inodes_limit"], 2000)
    assert 0 < usage["host_bytes"] <= 64 * MIB  # the sparse image on the host (written back lazily)
    human = run_cli("show", task.id).stdout
    assert "MiB" in human and "inodes" in human
    assert svc.status(task.id)["workspace_usage"]["bytes_used"] >= 10 * MIB  # MCP get_task_status


def test_reboot_doctor_reports_and_fix_remounts(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "survives a reboot", **SMALL)
    image, ws = volume(svc, task.id)
    svc.exec(task.id, "echo kept > kept.txt")
    svc.pause(task.id)
    subprocess.run(["umount", str(ws)], check=True)  # what a reboot leaves: the image, no mount
    assert not quota.is_mounted(image, ws) and quota.loop_devices(image) == []
    assert list(ws.iterdir()) == []
    with pytest.raises(PermissionError):  # the bare directory underneath takes no writes, not even root's
        (ws / "stray.txt").write_text("lost")

    for _ in range(2):  # reported only, so reported again
        findings = json.loads(run_cli("doctor", "--json").stdout)
        [f] = [f for f in findings if f["task_id"] == task.id]
        assert f["kind"] == "unmounted-workspace" and not f["fixed"] and str(image) in f["detail"]
        assert not quota.is_mounted(image, ws)

    findings = json.loads(run_cli("doctor", "--fix", "--json").stdout)
    [f] = [f for f in findings if f["task_id"] == task.id]
    assert f["fixed"] and f["action"] == "mounted"
    assert quota.is_mounted(image, ws) and (ws / "kept.txt").read_text() == "kept\n"
    assert svc.exec(task.id, "cat kept.txt").stdout == "kept\n"
    assert svc.doctor() == []
    # any use of the workspace mounts it as well, e.g. `show` reading the task's memory
    svc.pause(task.id)
    subprocess.run(["umount", str(ws)], check=True)
    usage = json.loads(run_cli("show", task.id, "--json").stdout)["workspace_usage"]
    assert usage["mounted"] is True and usage["bytes_used"] > 0 and quota.is_mounted(image, ws)


def test_container_never_starts_on_an_unmounted_workspace(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "start after reboot", **SMALL)
    image, ws = volume(svc, task.id)
    svc.exec(task.id, "echo kept > kept.txt")
    # a command on a stopped task starts the container: the volume is mounted first
    svc.pause(task.id)
    subprocess.run(["umount", str(ws)], check=True)
    assert svc.exec(task.id, "cat kept.txt && df -k . | tail -1").stdout.startswith("kept\n")
    assert quota.is_mounted(image, ws)
    # resume-task after a reboot mounts it too
    svc.pause(task.id)
    subprocess.run(["umount", str(ws)], check=True)
    r = run_cli("resume-task", task.id, "--agent", "a")
    assert r.returncode == 0, r.stderr
    assert quota.is_mounted(image, ws)
    assert svc.exec(task.id, "cat kept.txt").stdout == "kept\n"
    # unmounted on the host while the container runs: the container keeps the filesystem,
    # and mounting again reuses its loop device (one filesystem, never two on one image)
    subprocess.run(["umount", str(ws)], check=True)
    assert len(quota.loop_devices(image)) == 1
    assert svc.exec(task.id, "echo again >> kept.txt && cat kept.txt").stdout == "kept\nagain\n"
    assert quota.is_mounted(image, ws) and len(quota.loop_devices(image)) == 1
    assert (ws / "kept.txt").read_text() == "kept\nagain\n"


def test_missing_volume_is_reported_and_the_task_failed(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "volume lost", **SMALL)
    image, ws = volume(svc, task.id)
    svc.pause(task.id)
    subprocess.run(["umount", str(ws)], check=True)
    image.unlink()
    r = run_cli("doctor", "--fix", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    [f] = [f for f in json.loads(r.stdout) if f["task_id"] == task.id]
    assert f["kind"] == "missing-volume" and f["fixed"] and f["action"] == "marked failed"
    assert svc.get(task.id).status is Status.FAILED
    # starting it again is refused with one clear line, never a container on the bare directory
    r = run_cli("resume-task", task.id)
    assert r.returncode == 6 and r.stderr.strip().splitlines()[-1].startswith("error: the workspace volume")
    assert svc.get(task.id).container_id == task.container_id
    assert docker_state(svc, task.container_id) == "exited"


def docker_state(svc: TaskService, cid: str | None) -> str:
    return str(svc.sandbox.api.inspect_container(cid)["State"]["Status"])


def test_cleanup_frees_the_volume(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "short lived", **SMALL)
    image, ws = volume(svc, task.id)
    svc.exec(task.id, "head -c 5000000 /dev/urandom > data.bin")
    svc.complete(task.id)
    r = run_cli("cleanup-task", task.id)  # archived, workspace kept: still mounted
    assert r.returncode == 0, r.stderr
    assert quota.is_mounted(image, ws)
    r = run_cli("cleanup-task", task.id, "--remove-workspace", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "archived"
    assert_released(svc, task.id)
    assert svc.doctor() == []


def test_create_rollback_leaves_no_mount_or_loop_device(home: Path, repo: Path, docker_engine) -> None:
    class Boom:
        @hookimpl
        def task_start(self, service: TaskService, task: object) -> None:
            raise InvalidInput("boom: a plugin refused the task")

    pm = make_manager(load_entrypoints=False)
    pm.register(Boom(), name="boom")
    svc = TaskService(home, plugin_manager=pm)
    with pytest.raises(InvalidInput, match="boom"):
        svc.create_task(repo, "doomed", task_id="doomed", **SMALL)
    assert svc.list_tasks() == []
    assert_released(svc, "doomed")


def test_killed_create_is_rolled_back_by_doctor(svc: TaskService, repo: Path) -> None:
    r = run_cli("create-task", "killed", "--repo", str(repo), "--id", "killed", "--disk", "64m",
                "--inodes", "2000", env={"TASKBOX_CRASH_AT": "create.workspace"})
    assert r.returncode == -9
    image, ws = volume(svc, "killed")
    assert quota.is_mounted(image, ws)  # the crash left the volume mounted
    findings = json.loads(run_cli("doctor", "--fix", "--json").stdout)
    assert any(f["kind"] == "interrupted-create" and f["fixed"] for f in findings)
    assert svc.list_tasks() == []
    assert_released(svc, "killed")


def test_orphan_volume_is_removed_by_doctor(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "orphaned", **SMALL)
    svc.registry.delete_task(task.id)  # e.g. a registry restored from an old backup
    kinds = {f["kind"] for f in svc.doctor(fix=False)}
    assert {"orphan-volume", "orphan-workspace"} <= kinds
    assert quota.is_mounted(*volume(svc, task.id))  # nothing is touched without --fix
    fixed = {f["kind"]: f for f in svc.doctor(fix=True)}
    assert fixed["orphan-volume"]["fixed"] and fixed["orphan-workspace"]["fixed"]
    assert_released(svc, task.id)
    assert svc.doctor() == []


def test_quota_values_from_task_policy_and_settings(svc: TaskService, repo: Path) -> None:
    # the settings' default (1M inodes) is scaled down to what a small disk can hold
    task = svc.create_task(repo, "defaults", lazy=True, disk="128m")
    assert task.metadata["quota"] == {"disk": 128 * MIB, "inodes": 128 * MIB // 4096}
    r = run_cli("create-task", "flags", "--repo", str(repo), "--disk", "96m", "--inodes", "2500", "--lazy", "--json")
    assert r.returncode == 0, r.stderr
    flagged = svc.get(json.loads(r.stdout)["task_id"])
    assert flagged.metadata["quota"] == {"disk": 96 * MIB, "inodes": 2500}
    assert near(svc.workspace_usage(flagged)["inodes_limit"], 2500)  # type: ignore[index]

    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text(
        '[limits]\ndisk = "80m"\ninodes = 3000\nmax_disk = "256m"\nmax_inodes = 5000\n')
    task = svc.create_task(repo, "policy defaults", lazy=True)
    assert task.metadata["quota"] == {"disk": 80 * MIB, "inodes": 3000}
    with pytest.raises(PolicyDenied, match="maximum of 256m"):
        svc.create_task(repo, "too big", lazy=True, disk="512m")
    with pytest.raises(PolicyDenied, match="maximum of 5000"):
        svc.create_task(repo, "too many", lazy=True, inodes=9000)


@pytest.mark.parametrize(("options", "message"), [
    ({"disk": "1m"}, "below the minimum of 64m"),
    ({"disk": "0"}, "cannot be 0"),
    ({"disk": "lots"}, "not a size"),
    ({"disk": "64m", "inodes": 500}, "below the minimum of 1000"),
    ({"disk": "64m", "inodes": 1_000_000}, "too many for a disk quota of 64 MiB"),
    ({"disk": "100t"}, "more than the .* free on the host filesystem"),
])
def test_bad_quotas_are_refused_before_anything_changes(svc: TaskService, repo: Path, options: dict,
                                                        message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        svc.create_task(repo, "refused", lazy=True, **options)
    assert svc.list_tasks() == []
    assert not svc.paths.volumes.exists() or list(svc.paths.volumes.iterdir()) == []


def test_quota_off_by_setting_gives_a_plain_directory(home: Path, repo: Path, docker_engine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBOX_WORKSPACE_QUOTA", "0")
    svc = TaskService(home)
    task = svc.create_task(repo, "no quota", lazy=True)
    ws = Path(task.workspace_path)
    assert "quota" not in task.metadata and not os.path.ismount(ws) and not svc.paths.volume(task.id).exists()
    assert (ws / "README.md").exists() and svc.workspace_usage(task) is None
    assert any("no disk or inode quota" in w for w in svc.sandbox_warnings(task))
    assert "no quota" in run_cli("show", task.id).stdout
    (repo / ".taskbox").mkdir()
    (repo / ".taskbox" / "policy.toml").write_text('[limits]\nmax_disk = "1g"\n')
    with pytest.raises(PolicyDenied, match="no disk quota"):
        svc.create_task(repo, "needs a quota", lazy=True)


def test_mount_failure_is_one_clear_line_and_leaves_nothing(svc: TaskService, repo: Path) -> None:
    # root without CAP_SYS_ADMIN cannot mount, like a host without loop devices or privileges
    r = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", sys.executable, "-m", "taskbox",
                        "create-task", "no mount", "--repo", str(repo), "--lazy", "--id", "nomount"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: could not mount the workspace volume") and "permission denied" in line
    assert 'set workspace_quota = "0"' in line
    assert svc.list_tasks() == []
    assert_released(svc, "nomount")


def test_finished_task_statuses_keep_their_volume(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "aborted keeps files", **SMALL)
    svc.exec(task.id, "echo work > work.txt")
    assert svc.abort(task.id).status is Status.ABORTED
    image, ws = volume(svc, task.id)
    assert quota.is_mounted(image, ws) and (ws / "work.txt").read_text() == "work\n"
    svc.cleanup(task.id, remove_workspace=True)
    assert_released(svc, task.id)
