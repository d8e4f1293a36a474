"""state.json integrity and recovery from the append-only logs (SPEC §3)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from taskbox import TaskService
from taskbox.memory import TaskMemory, checksum, validate


def _fill(svc: TaskService, repo: Path):
    task = svc.create_task(repo, "memory work", agent="alice", model="m1")
    a = svc.attach(task.id, "alice", "m1")
    svc.update_todos(task.id, [{"text": "one", "major": True}, {"text": "two"}], a.session.id)
    svc.update_todos(task.id, [{"id": "t1", "status": "completed"}], a.session.id)
    svc.exec(task.id, "true", session_id=a.session.id)
    svc.exec(task.id, "false", session_id=a.session.id)
    return task, a


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text("{ not json"),
        lambda p: p.write_bytes(b"\xff\xfe garbage"),
        lambda p: p.write_text(json.dumps({"task_id": "x"})),  # fails schema validation
        lambda p: p.write_text(p.read_text().replace('"one"', '"edited by hand"')),  # checksum mismatch
        lambda p: p.unlink(),
    ],
    ids=["unparsable", "binary", "schema", "checksum", "missing"],
)
def test_damaged_state_is_rebuilt_from_logs(svc: TaskService, repo: Path, damage) -> None:
    task, a = _fill(svc, repo)
    svc.detach(task.id, a.session.id)
    state_file = Path(task.workspace_path) / ".task-memory/state.json"
    damage(state_file)

    res = svc.attach(task.id, "bob", "m2")
    if state_file.exists() and "memory.restored" in [e["type"] for e in svc.registry.events(task.id)]:
        # a missing state.json comes back whole from the memory ref saved at detach (branches.md)
        assert res.recovery is None
    else:
        assert res.recovery is not None
    todos = {t["id"]: t for t in res.restored_state["todos"]}
    assert todos["t1"]["status"] == "completed" and todos["t1"]["major"] is True
    assert todos["t2"]["text"] == "two"
    metrics = res.restored_state["metrics"]
    assert metrics["tool_calls"] == 2 and metrics["agents_used"] == ["alice", "bob"]
    assert validate(json.loads(state_file.read_text())) is None  # a valid file again
    copies = list(state_file.parent.glob("state.json.corrupted.*"))
    if res.recovery is None or res.recovery.reason == "state.json is missing":
        assert copies == []
    else:
        assert len(copies) == 1 and res.recovery.corrupted_copy.endswith(copies[0].name)
    kinds = [e["type"] for e in svc.registry.events(task.id)]
    assert ("memory.restored" if res.recovery is None else "memory.recovered") in kinds


def test_checksum_covers_everything_but_itself() -> None:
    state = {"a": 1, "todos": [{"id": "t1"}]}
    c = checksum(state)
    assert checksum({**state, "checksum": "zzz", "checksum_algorithm": "sha256"}) == c
    assert checksum({**state, "a": 2}) != c


def test_state_writes_survive_sigkill_at_any_moment(tmp_path: Path) -> None:
    """A writer killed mid-update leaves the old or the new state.json, never a torn one."""
    ws = tmp_path / "ws"
    ws.mkdir()
    mem = TaskMemory(ws, tmp_path / "lock")
    mem.init("t", "active", "b", "exclusive")
    defaults = {"task_id": "t", "status": "active", "branch": "b", "lock_mode": "exclusive"}
    writer = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from pathlib import Path
        from taskbox.memory import TaskMemory
        mem = TaskMemory(Path({str(ws)!r}), Path({str(tmp_path / "lock")!r}))
        n = 0
        while True:
            n += 1
            # every generation writes 300 todos carrying its number: a torn write would mix them
            mem.update({defaults!r}, lambda s: s.__setitem__(
                "todos", [{{"id": f"t{{i}}", "text": "x" * 200, "gen": n}} for i in range(300)]))
    """)
    rng = random.Random(7)
    for _round in range(6):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(rng.uniform(0.2, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state, recovery = mem.load(defaults)
        assert recovery is None  # never needed rebuilding: the file was whole
        gens = {t.get("gen") for t in state["todos"]}
        assert len(gens) <= 1 and (not state["todos"] or len(state["todos"]) == 300)


def test_memory_folder_replaced_by_a_link_is_refused(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    from taskbox import PathOutsideWorkspace

    task = svc.create_task(repo, "link attack")
    outside = tmp_path / "outside"
    outside.mkdir()
    # the agent replaces .task-memory with a link to a host directory
    svc.exec(task.id, "rm -rf .task-memory && ln -s " + str(outside) + " .task-memory")
    assert svc.exec(task.id, "echo still works").stdout == "still works\n"
    assert "memory.refused" in [e["type"] for e in svc.registry.events(task.id)]
    with pytest.raises(PathOutsideWorkspace):
        svc.log_decision(task.id, "write through the link")
    with pytest.raises(PathOutsideWorkspace):
        svc.update_todos(task.id, [{"text": "x"}])
    assert list(outside.iterdir()) == []


def test_decisions_round_trip(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "decide", lazy=True)
    svc.log_decision(task.id, "use SQLite", context="registry", rationale="embedded", alternatives="postgres",
                     agent="alice")
    [d] = svc.decisions(task.id)
    assert (d["agent"], d["decision"], d["rationale"], d["alternatives"]) == ("alice", "use SQLite", "embedded", "postgres")
