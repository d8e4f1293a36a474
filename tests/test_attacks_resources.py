"""Adversarial tests, part 2: resource exhaustion. Fork bomb, memory bomb, runaway commands and
output floods are contained by the task's own limits, reported as what they are, and neither
the host nor another task stops responding.

The limits here are deliberately small (pids 64, memory 96–160 MiB, half a core) so the
bombs are safe on a 2-core CI machine."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from taskbox import CommandTimeout, ContainerState, Status, TaskService


@pytest.fixture
def small(svc: TaskService, repo: Path):
    """A task with tight limits, safe to bomb on a small machine."""
    return svc.create_task(repo, "bomb target", memory="96m", pids_limit=64, cpus=0.5)


def test_fork_bomb_is_contained_while_host_and_another_task_respond(svc: TaskService, repo: Path, small) -> None:
    other = svc.create_task(repo, "bystander", memory="128m", cpus=0.5)
    box: dict[str, object] = {}

    def bomb() -> None:
        try:
            # the shell stays in the foreground, so the bomb runs until the timeout hits it
            svc.exec(small.id, "bash -c ':(){ :|:& };:; sleep 60'", timeout=12)
        except CommandTimeout as exc:
            box["timeout"] = exc

    t = threading.Thread(target=bomb)
    t.start()
    time.sleep(3)  # let it reach the pids limit
    peak = 0
    host_worst = 0.0
    other_worst = 0.0
    for _ in range(4):
        usage = svc.sandbox.memory_usage(small.container_id or "")
        peak = max(peak, usage["pids"] if usage else 0)
        t0 = time.monotonic()
        subprocess.run(["true"], check=True)
        host_worst = max(host_worst, time.monotonic() - t0)
        t0 = time.monotonic()
        assert svc.exec(other.id, "echo alive").stdout.strip() == "alive"
        other_worst = max(other_worst, time.monotonic() - t0)
        time.sleep(0.5)
    t.join(30)
    assert not t.is_alive()
    assert "timeout" in box  # the bomb ran until its timeout and was killed
    assert 30 <= peak <= 64  # it did fork, up to the limit and no further
    assert host_worst < 2.0, f"host took {host_worst:.2f}s to run `true`"
    assert other_worst < 5.0, f"the other task took {other_worst:.2f}s to answer"
    # nothing of the bomb is left, and the task itself still works
    ps = svc.exec(small.id, "ps -eo comm=")
    assert ps.exit_code == 0 and "bash" not in ps.stdout.split(), ps.stdout
    assert svc.exec(small.id, "echo ok").stdout.strip() == "ok"


def test_memory_bomb_is_oom_killed_and_reported(svc: TaskService, small) -> None:
    r = svc.exec(small.id, "python3 -c \"a=[]\nwhile True: a.append(b'x' * 10**7)\"", timeout=60)
    assert r.exit_code == 137
    assert r.oom_killed is True and r.timed_out is False
    assert "out-of-memory" in r.stderr
    events = [e["type"] for e in svc.registry.events(small.id)]
    assert "task.oom_killed" in events
    last = svc.executions(small.id, 1)[-1]
    assert last["oom_killed"] is True and last["exit_code"] == 137
    # the container survived (only the bomb died) and is usable
    assert svc.sandbox.state(small.container_id) is ContainerState.RUNNING
    ok = svc.exec(small.id, "echo ok")
    assert ok.stdout.strip() == "ok" and ok.oom_killed is False


def test_plain_exit_137_is_not_mistaken_for_oom(svc: TaskService, small) -> None:
    r = svc.exec(small.id, "kill -9 $$")
    assert r.exit_code == 137 and r.oom_killed is False


def test_timeout_kills_background_and_setsid_children(svc: TaskService, small) -> None:
    cmd = ("sleep 301 & (sleep 302 &) ; setsid sleep 303 & nohup setsid sh -c 'sleep 304' >/dev/null 2>&1 & "
           "sleep 300")
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        svc.exec(small.id, cmd, timeout=2)
    assert time.monotonic() - t0 < 150  # killed, not waited for (the command sleeps 300 s): not a speed check
    assert info.value.details["result"]["timed_out"] is True
    time.sleep(0.5)
    ps = svc.exec(small.id, "ps -eo args").stdout
    for n in ("300", "301", "302", "303", "304"):
        assert f"sleep {n}" not in ps, ps
    # a background process left by a command that *finished* is the agent's business: kept
    svc.exec(small.id, "setsid sleep 305 >/dev/null 2>&1 &")
    assert "sleep 305" in svc.exec(small.id, "ps -eo args").stdout


def test_output_flood_is_truncated(svc: TaskService, small) -> None:
    t0 = time.monotonic()
    r = svc.exec(small.id, "head -c 30000000 /dev/zero | tr '\\0' x; head -c 5000000 /dev/zero >&2",
                 output_limit=100_000, timeout=120)
    assert r.exit_code == 0 and r.truncated is True
    assert len(r.stdout) == 100_000 and len(r.stderr) == 100_000
    assert time.monotonic() - t0 < 60
    logged = svc.executions(small.id, 1)[-1]
    assert len(logged["stdout"]) <= svc.settings.log_output_limit and logged["truncated"] is True


def test_memory_pressure_levels_act_once_each(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "pressure", memory="160m", cpus=0.5)
    svc.exec(task.id, "setsid nohup python3 -c \"import time; b = b'x' * (80 * 2**20); time.sleep(120)\" "
                      ">/dev/null 2>&1 &")
    deadline = time.monotonic() + 20
    while True:
        s = svc.sample_pressure(svc.get(task.id))
        if s and s.percent > 45 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert s is not None and 45 < s.percent < 70, s

    def check(levels: tuple[float, float, float]) -> str:
        svc.settings.pressure_warning, svc.settings.pressure_critical, svc.settings.pressure_emergency = levels
        got = svc.check_pressure(svc.get(task.id))
        return got.level if got else "none"

    assert check((40, 80, 90)) == "warning"
    assert check((40, 80, 90)) == "warning"  # same level again: no new action
    assert check((20, 40, 90)) == "critical"
    events = [e["type"] for e in svc.registry.events(task.id)]
    assert events.count("resource.warning") == 1 and events.count("resource.critical") == 1
    assert len(svc.list_checkpoints(task.id)) == 1  # the critical level's checkpoint
    assert check((10, 20, 30)) == "emergency"
    events = [e["type"] for e in svc.registry.events(task.id)]
    assert "resource.emergency" in events and "resource.paused" in events
    cps = svc.list_checkpoints(task.id)
    assert len(cps) == 2 and cps[-1]["trigger"] == "emergency"
    paused = svc.get(task.id)
    assert paused.status is Status.PAUSED
    assert svc.sandbox.state(paused.container_id) is ContainerState.STOPPED
