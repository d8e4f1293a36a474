"""Automatic checkpoints (major todo, risky command, detach, completion) and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from taskbox import TaskService, risk
from taskbox.workspace import hand_over

from .conftest import run_cli


def plan_log(ws: Path) -> str:
    text = (ws / "Plan.md").read_text()
    return text.split("<!-- taskbox:log -->")[1].split("<!-- /taskbox:log -->")[0]


def decisions_md(ws: Path) -> str:
    return (ws / ".task-memory" / "decisions.md").read_text()


def test_major_todo_risky_command_and_completion_take_checkpoints(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "auto checkpoints")
    ws = Path(task.workspace_path)
    svc.update_todos(task.id, [{"text": "design the API", "major": True}, {"text": "small fix"}])
    svc.update_todos(task.id, [{"id": "t2", "status": "completed"}])
    assert svc.list_checkpoints(task.id) == []  # a minor todo takes none
    svc.update_todos(task.id, [{"id": "t1", "status": "completed"}])
    [major] = svc.list_checkpoints(task.id)
    assert major["trigger"] == "major-todo" and "design the API" in major["reason"]

    (ws / "build").mkdir()
    (ws / "build" / "artifact.o").write_bytes(b"\x7fELF")
    hand_over(ws)
    svc.exec(task.id, "ls build")  # harmless: no checkpoint
    assert len(svc.list_checkpoints(task.id)) == 1
    svc.exec(task.id, "rm -rf build")
    risky = svc.list_checkpoints(task.id)[-1]
    assert risky["trigger"] == "risky-command"
    assert "rm -rf build" in risky["reason"] and "medium risk (6/10" in risky["reason"]
    assert not (ws / "build").exists()
    svc.restore_checkpoint(task.id, risky["checkpoint_id"])  # taken before the command ran
    assert (ws / "build" / "artifact.o").read_bytes() == b"\x7fELF"

    risk.set_options(repo, high_only=True)  # the project says: only before high risk
    svc.exec(task.id, "rm -rf build")
    assert len(svc.list_checkpoints(task.id)) == 2
    svc.exec(task.id, "rm -rf .cache && git push 2>/dev/null || true")
    assert svc.list_checkpoints(task.id)[-1]["reason"].count("high risk") == 1

    for cp in svc.list_checkpoints(task.id):
        # each one is in decisions.md and in Plan.md's iteration log, with its reason
        assert f"Checkpoint `{cp['name']}` ({cp['checkpoint_id']}) taken" in decisions_md(ws)
        assert f"checkpoint `{cp['name']}` ({cp['checkpoint_id']}, {cp['trigger']})" in plan_log(ws)
    assert "- **Context:** trigger: risky-command" in decisions_md(ws)
    assert "major todo `#t1` completed: design the API" in plan_log(ws)

    svc.complete(task.id, "all done")
    final = svc.list_checkpoints(task.id)[-1]
    assert final["trigger"] == "final" and final["pinned"] and final["name"] == "final"
    changed = {c["path"] for c in svc.checkpoint_diff(task.id, final["checkpoint_id"], "current")["changes"]}
    assert "Plan.md" not in changed  # the final checkpoint already holds the final summary
    assert svc.state(task.id)["metrics"]["checkpoints"] == len(svc.list_checkpoints(task.id))


def test_a_failing_automatic_checkpoint_never_blocks_the_command(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "store broken")
    store = svc.checkpoints.store(task.id)
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("not a repository")  # the store cannot even be created
    res = svc.exec(task.id, "echo hi > out.txt && cat out.txt")
    assert res.stdout == "hi\n"
    events = [e for e in svc.registry.events(task.id) if e["type"] == "checkpoint.auto_failed"]
    assert events and events[0]["payload"]["trigger"] == "risky-command"


def test_detach_can_save_a_checkpoint(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "detach checkpoint")
    a = svc.attach(task.id, "alice", "m")
    svc.write_file(task.id, "notes.md", b"half way\n")
    res = svc.detach(task.id, a.session.id, save_checkpoint=True, checkpoint_name="before-lunch")
    [cp] = svc.list_checkpoints(task.id)
    assert res["checkpoint_id"] == cp["checkpoint_id"]
    assert cp["name"] == "before-lunch" and cp["trigger"] == "detach" and "alice detached" in cp["reason"]


def test_checkpoint_cli(home: Path, repo: Path, tmp_path: Path) -> None:
    tid = json.loads(run_cli("create-task", "cli checkpoints", "--repo", str(repo), "--lazy", "--json").stdout)["task_id"]
    ws = Path(json.loads(run_cli("show", tid, "--json").stdout)["workspace_path"])
    (ws / "a.txt").write_text("one\n")
    r = run_cli("checkpoint", tid, "first", "-d", "the start", "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["name"] == "first" and first["description"] == "the start" and first["files"] >= 3
    (ws / "a.txt").write_text("two\n")
    (ws / "b.txt").write_text("new\n")
    r = run_cli("checkpoint", tid)
    assert r.returncode == 0 and "manual-2" in r.stdout
    r = run_cli("checkpoint", "list", tid)
    assert "first" in r.stdout and "manual-2" in r.stdout and "* cp-" in r.stdout
    r = run_cli("checkpoint", "diff", tid, "first", "manual-2")
    assert "A b.txt" in r.stdout and "M a.txt" in r.stdout and "-one" in r.stdout and "+two" in r.stdout
    r = run_cli("restore-checkpoint", tid, "--list", "--json")
    assert [c["name"] for c in json.loads(r.stdout)] == ["first", "manual-2"]
    r = run_cli("restore-checkpoint", tid, "-c", "first")
    assert r.returncode == 0 and "restored" in r.stdout
    assert (ws / "a.txt").read_text() == "one\n" and not (ws / "b.txt").exists()
    r = run_cli("restore-checkpoint", tid)  # the newest
    assert r.returncode == 0 and (ws / "b.txt").exists()
    r = run_cli("restore-checkpoint", tid, "-c", "nope")
    assert r.returncode == 3 and "no checkpoint 'nope'" in r.stderr
    r = run_cli("checkpoint", tid, "bad name!")
    assert r.returncode == 2 and r.stderr.startswith("error:")
    r = run_cli("checkpoint", "export", tid, "first", str(tmp_path), "--json")
    exported = json.loads(r.stdout)["path"]
    r = run_cli("checkpoint", "import", tid, exported, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["trigger"] == "import"
    r = run_cli("checkpoint", "delete", tid, "manual-2")
    assert r.returncode == 0
    assert run_cli("gc").returncode == 0
    assert [c["name"] for c in json.loads(run_cli("checkpoint", "list", tid, "--json").stdout)] == ["first", "first"]
