"""The warm pool (issue 16 goal 4; taskbox.pool): real Docker, real mounts, real git.

A slot is a running container whose /workspace is a per-slot directory bound with rslave
propagation; a create claims one (a rename) and binds the task's workspace onto that
directory. These tests check what a user relies on: a pooled task's sandbox is the same as
a cold one, sees exactly its own workspace, is never shared, leaves nothing behind, and
crashes in the middle are repaired by the doctor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskbox import TaskService
from taskbox.models import ContainerState
from taskbox.pool import Pool
from taskbox.sandbox import LABEL_HOME, LABEL_POOL, LABEL_TASK


def _mounts_under(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4]
            if mp == str(path) or mp.startswith(f"{path}/"):
                out.append(mp)
    return out


@pytest.fixture
def pooled(home: Path, docker_engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TaskService]:
    monkeypatch.setenv("TASKBOX_POOL_SIZE", "2")
    monkeypatch.setenv("TASKBOX_MEMORY", "256m")
    service = TaskService(home)
    yield service
    # Containers first (each removal releases its slot), then whatever slot is left, then the root.
    for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={service.home_label}"}):
        service.sandbox.remove(c["Id"])
    pool = Pool(service.paths.pool)
    for s in pool.slots():
        pool.release(s.id)
    pool.close()
    assert not _mounts_under(service.paths.pool)


def _pool_containers(service: TaskService) -> list[dict[str, Any]]:
    return service.sandbox.pool_containers(service.home_label)


def _sh(service: TaskService, task_id: str, command: str) -> str:
    r = service.exec(task_id, command)
    assert r.exit_code == 0, r.stderr
    return r.stdout


def test_pool_size_zero_makes_no_containers(home: Path, repo: Path, svc: TaskService) -> None:
    assert svc.settings.pool_size == 0
    task = svc.create_task(repo, "no pool here")
    svc.tick()  # the housekeeping loop: nothing to fill
    assert _pool_containers(svc) == []
    assert not svc.paths.pool.exists()
    assert not [e for e in svc.events() if e["type"].startswith("pool.")]
    info = svc.sandbox.api.inspect_container(task.container_id)
    assert info["Config"]["Labels"][LABEL_TASK] == task.id


def test_claimed_sandbox_is_the_task_workspace_and_matches_a_cold_one(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.tick()  # the housekeeping loop fills the pool to pool_size
    free = [s for s in svc.pool.slots() if s.state == "free"]
    assert len(free) == 2
    warm = svc.create_task(repo, "warm task")
    assert warm.container_id in {s.container_id for s in free}
    claimed = [e for e in svc.events(warm.id) if e["type"] == "pool.claimed"]
    assert claimed and claimed[0]["payload"]["container_id"] == warm.container_id

    # It sees the task's files, and its writes land in the task's workspace.
    assert _sh(svc, warm.id, "cat app.py") == "print('hello')\n"
    _sh(svc, warm.id, "echo from-sandbox > made.txt && mkdir -p d && echo x > d/y")
    ws = Path(warm.workspace_path)
    assert (ws / "made.txt").read_text() == "from-sandbox\n"
    assert (ws / "d" / "y").read_text() == "x\n"
    (ws / "host.txt").write_text("from-host\n")
    assert _sh(svc, warm.id, "cat host.txt") == "from-host\n"
    assert svc.sandbox.agent_keys is not None and svc.sandbox.agent_keys.load(warm.container_id)

    # The same profile made cold (pool drained): the same hardening, limits, network, agent.
    svc.pool_drain()
    cold = svc.create_task(repo, "cold task")
    assert not [e for e in svc.events(cold.id) if e["type"] == "pool.claimed"]
    a = svc.sandbox.api.inspect_container(warm.container_id)
    b = svc.sandbox.api.inspect_container(cold.container_id)
    for key in ("CapDrop", "CapAdd", "SecurityOpt", "PidsLimit", "Memory", "MemorySwap", "NanoCpus", "Init",
                "Privileged", "IpcMode", "CgroupnsMode", "Devices", "Runtime", "Ulimits", "LogConfig",
                "NetworkMode", "ReadonlyRootfs", "PidMode", "UsernsMode"):
        assert a["HostConfig"].get(key) == b["HostConfig"].get(key), key
    for key in ("User", "Env", "WorkingDir", "Cmd", "Image", "Entrypoint"):
        assert a["Config"].get(key) == b["Config"].get(key), key
    assert a["Config"]["Labels"][LABEL_HOME] == b["Config"]["Labels"][LABEL_HOME]
    mounts_a = {m["Destination"]: (m["Type"], m["RW"]) for m in a["Mounts"]}
    mounts_b = {m["Destination"]: (m["Type"], m["RW"]) for m in b["Mounts"]}
    assert mounts_a == mounts_b
    assert not (a["HostConfig"].get("Binds") or []) == [] and "/var/run/docker.sock" not in str(a["Mounts"])
    assert _sh(svc, warm.id, "id -u") == _sh(svc, cold.id, "id -u")
    assert _sh(svc, warm.id, "grep CapEff /proc/self/status") == _sh(svc, cold.id, "grep CapEff /proc/self/status")


def test_concurrent_creates_never_share_a_slot(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.pool_fill(2)
    results: dict[int, Any] = {}

    def create(i: int) -> None:
        try:
            results[i] = svc.create_task(repo, f"race {i}", task_id=f"race-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tasks = [results[i] for i in range(4)]
    assert all(not isinstance(t, BaseException) for t in tasks), tasks
    cids = [t.container_id for t in tasks]
    assert len(set(cids)) == 4
    claims = [e for t in tasks for e in svc.events(t.id) if e["type"] == "pool.claimed"]
    assert len(claims) == 2  # two slots, two claims; the other two creates went cold
    assert len({c["payload"]["slot"] for c in claims}) == 2
    assert {s.task_id for s in svc.pool.slots() if s.state == "claimed"} == {c["task_id"] for c in claims}
    for t in tasks:  # each sees exactly its own workspace
        _sh(svc, t.id, f"echo {t.id} > who.txt")
    for t in tasks:
        assert (Path(t.workspace_path) / "who.txt").read_text() == f"{t.id}\n"
        assert _sh(svc, t.id, "cat who.txt") == f"{t.id}\n"


def test_cleanup_leaves_no_slot_and_never_exposes_the_workspace(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.pool_fill(1)
    first = svc.create_task(repo, "first")
    slot = svc.pool.of_container(first.container_id or "")
    assert slot is not None and slot.task_id == first.id
    _sh(svc, first.id, "echo secret-of-first > secret.txt")
    svc.abort(first.id)
    svc.cleanup(first.id)
    assert not slot.path.exists()
    assert not [m for m in _mounts_under(svc.paths.pool) if m != str(svc.paths.pool)]
    assert svc.sandbox.state(first.container_id) is ContainerState.LOST

    svc.pool_fill(1)
    second = svc.create_task(repo, "second")
    assert [e for e in svc.events(second.id) if e["type"] == "pool.claimed"]
    out = svc.exec(second.id, "cat secret.txt; ls").stdout
    assert "secret-of-first" not in out and "secret.txt" not in out
    assert (Path(first.workspace_path) / "secret.txt").exists()  # the workspace itself stays its task's


def test_profile_mismatch_creates_cold(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.pool_fill(1)
    before = {s.id for s in svc.pool.slots() if s.state == "free"}
    task = svc.create_task(repo, "bigger", memory="320m")
    assert not [e for e in svc.events(task.id) if e["type"].startswith("pool.")]
    assert {s.id for s in svc.pool.slots() if s.state == "free"} == before
    info = svc.sandbox.api.inspect_container(task.container_id)
    assert info["HostConfig"]["Memory"] == 320 * 1024**2
    assert info["Config"]["Labels"][LABEL_TASK] == task.id


def test_doctor_repairs_a_half_claimed_slot(pooled: TaskService, repo: Path, home: Path) -> None:
    svc = pooled
    svc.pool_fill(2)
    env = {**os.environ, "TASKBOX_CRASH_AT": "pool.claim", "TASKBOX_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "taskbox", "create-task", "--repo", str(repo), "crashes mid-claim"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    states = sorted(s.state for s in svc.pool.slots())
    assert states == ["free", "half-claimed"]
    half = next(s for s in svc.pool.slots() if s.state == "half-claimed")
    other = next(s for s in svc.pool.slots() if s.state == "free")
    kinds = {f["kind"] for f in svc.doctor()}
    assert "pool-half-claimed" in kinds
    svc.doctor(fix=True)
    assert not half.path.exists()
    assert svc.sandbox.state(half.container_id) is ContainerState.LOST
    assert svc.pool.slot(other.id).state == "free"  # the other slot is untouched
    assert all(s.state == "free" for s in svc.pool.slots())  # (doctor's housekeeping refilled the pool)
    assert not [f for f in svc.doctor() if f["kind"].startswith("pool-")]
    task = svc.create_task(repo, "after the crash")  # the pool still serves
    assert [e for e in svc.events(task.id) if e["type"] == "pool.claimed"]


def test_engine_restart_and_reboot_are_repaired(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.pool_fill(2)
    task = svc.create_task(repo, "survives a reboot")
    free = next(s for s in svc.pool.slots() if s.state == "free")
    slot = svc.pool.of_container(task.container_id or "")
    assert slot is not None
    # What an engine restart leaves: containers stopped. What a reboot adds: no mounts.
    svc.sandbox.api.stop(free.container_id, timeout=1)
    svc.sandbox.api.stop(task.container_id, timeout=1)
    subprocess.run(["umount", "-l", str(slot.ws)], check=True)
    assert not svc.pool.bound(slot, Path(task.workspace_path))
    svc.settings.pool_size = 0  # the doctor's own housekeeping would refill (and clean) the pool first
    found = svc.doctor(fix=True)
    assert any(f["kind"] == "pool-dead-slot" for f in found)
    assert not free.path.exists()
    assert svc.sandbox.state(free.container_id) is ContainerState.LOST
    # The task's own slot is kept and its workspace bound in again.
    assert [f for f in found if f["kind"] == "pool-unbound" and f["fixed"]]
    assert svc.pool.bound(slot, Path(task.workspace_path))
    svc.ensure_running(task.id)
    assert _sh(svc, task.id, "cat app.py") == "print('hello')\n"
    # Without the doctor, the task's next start binds it itself.
    svc.sandbox.api.stop(task.container_id, timeout=1)
    subprocess.run(["umount", "-l", str(slot.ws)], check=True)
    svc.ensure_running(task.id)
    assert svc.pool.bound(slot, Path(task.workspace_path))
    assert _sh(svc, task.id, "cat app.py") == "print('hello')\n"
    assert [e for e in svc.events(task.id) if e["type"] == "pool.rebound"]
    svc.settings.pool_size = 2
    svc.tick()
    assert sum(1 for s in svc.pool.slots() if s.state == "free") == 2
    labels = [c["Labels"].get(LABEL_POOL) for c in _pool_containers(svc)]
    assert len(labels) == 3

    # The bind lost under a running, freshly claimed slot (its container sees the bare slot
    # directory): the doctor binds the workspace in again.
    fresh = svc.create_task(repo, "loses its mount")
    fresh_slot = svc.pool.of_container(fresh.container_id or "")
    assert fresh_slot is not None
    subprocess.run(["umount", "-l", str(fresh_slot.ws)], check=True)
    assert svc.exec(fresh.id, "cat app.py").exit_code != 0
    svc.settings.pool_size = 0
    found = svc.doctor(fix=True)
    assert [f for f in found if f["kind"] == "pool-unbound" and f["fixed"]]
    assert _sh(svc, fresh.id, "cat app.py") == "print('hello')\n"


def test_pool_cli(pooled: TaskService, repo: Path, home: Path) -> None:
    from tests.conftest import run_cli

    env = {"TASKBOX_HOME": str(home)}
    r = run_cli("pool", "fill", "--size", "1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("pool", "status", env=env)
    assert r.returncode == 0 and "free" in r.stdout
    r = run_cli("pool", "drain", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [s for s in pooled.pool.slots() if s.state == "free"] == []
    r = run_cli("pool", "fill", "--network", "allowlist", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_a_slot_of_an_image_since_rebuilt_is_not_used(pooled: TaskService, repo: Path, docker_engine: Any,
                                                     tmp_path: Path) -> None:
    svc = pooled
    tag = f"taskbox-pooltest:{tmp_path.name[-12:].lower().strip('_') or 'x'}"
    subprocess.run(["docker", "tag", svc.settings.image, tag], check=True)
    try:
        svc.pool_fill(1, image=tag)
        old = next(s for s in svc.pool.slots() if s.state == "free")
        ctx = tmp_path / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM {svc.settings.image}\nLABEL taskbox.test=rebuilt\n")
        subprocess.run(["docker", "build", "-q", "-t", tag, str(ctx)], check=True, capture_output=True)
        task = svc.create_task(repo, "after a rebuild", image=tag)
        failed = [e for e in svc.events(task.id) if e["type"] == "pool.claim_failed"]
        assert failed and "older build" in failed[0]["payload"]["error"]
        assert task.container_id != old.container_id
        assert svc.sandbox.state(old.container_id) is ContainerState.LOST and not old.path.exists()
        info = svc.sandbox.api.inspect_container(task.container_id)
        assert info["Image"] == svc.sandbox.image_id(tag)
        assert _sh(svc, task.id, "cat app.py") == "print('hello')\n"
    finally:
        for c in docker_engine.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            svc.sandbox.remove(c["Id"])
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_a_registry_rebuild_finds_a_pooled_task_s_container(pooled: TaskService, repo: Path, home: Path) -> None:
    svc = pooled
    svc.pool_fill(1)
    task = svc.create_task(repo, "rebuilt later")
    assert svc.pool.of_container(task.container_id or "") is not None
    import shutil

    shutil.rmtree(svc.paths.records)  # only the workspace and the slot's claim are left to say it
    out = TaskService.rebuild_registry(home)
    assert task.id in out["adopted"]
    again = TaskService(home)
    assert again.get(task.id).container_id == task.container_id
    assert not [f for f in again.doctor() if f["kind"].startswith("pool-")]


def test_the_housekeeping_loop_keeps_the_pool_filled(pooled: TaskService, repo: Path) -> None:
    import time

    svc = pooled
    with svc.housekeeping(interval=0.2):
        deadline = time.monotonic() + 60
        while sum(1 for s in svc.pool.slots() if s.state == "free") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(1 for s in svc.pool.slots() if s.state == "free") == 2
        task = svc.create_task(repo, "served by the loop")
        assert [e for e in svc.events(task.id) if e["type"] == "pool.claimed"]
        deadline = time.monotonic() + 60
        while sum(1 for s in svc.pool.slots() if s.state == "free") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert sum(1 for s in svc.pool.slots() if s.state == "free") == 2  # refilled after the claim
    assert [e for e in svc.events() if e["type"] == "pool.filled"]


def test_slots_filled_by_hand_serve_with_pool_size_zero(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.settings.pool_size = 0
    svc.tick()
    assert svc.pool.slots() == []  # nothing filled by the housekeeping
    svc.pool_fill(1)  # `taskbox pool fill --size 1`
    task = svc.create_task(repo, "hand-filled")
    assert [e for e in svc.events(task.id) if e["type"] == "pool.claimed"]


def test_a_lazy_task_s_first_start_claims_a_slot(pooled: TaskService, repo: Path) -> None:
    svc = pooled
    svc.pool_fill(1)
    task = svc.create_task(repo, "lazy one", lazy=True)
    assert task.container_id is None and [s.state for s in svc.pool.slots()] == ["free"]
    task = svc.ensure_running(task.id)
    assert [e for e in svc.events(task.id) if e["type"] == "pool.claimed"]
    assert _sh(svc, task.id, "cat app.py") == "print('hello')\n"


def test_a_fill_killed_part_way_is_cleaned_up_by_the_next(pooled: TaskService, home: Path) -> None:
    svc = pooled
    env = {**os.environ, "TASKBOX_CRASH_AT": "pool.fill", "TASKBOX_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "taskbox", "pool", "fill", "--size", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    [left] = svc.pool.slots()
    assert left.state == "starting"
    [orphan] = _pool_containers(svc)
    assert orphan["Labels"][LABEL_POOL] == left.id
    out = svc.pool_fill(1)
    assert out["removed"] == [left.id] and len(out["made"]) == 1
    assert svc.sandbox.state(orphan["Id"]) is ContainerState.LOST and not left.path.exists()
    assert [s.state for s in svc.pool.slots()] == ["free"]
