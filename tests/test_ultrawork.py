"""Ultrawork (issue 14): plans, the scheduler, sub-tasks in their own sandboxes merged back.

Real Docker and git throughout, except the plan and scheduler unit tests at the top.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskbox import TaskService, ultrawork
from taskbox.errors import InvalidInput
from taskbox.sandbox import LABEL_HOME, LABEL_TASK

from .conftest import git, run_cli

DIAMOND = """
parallel = 2
[[subtask]]
id = "a"
title = "base file"
command = "echo a > a.txt"
[[subtask]]
id = "b"
title = "b on a"
command = "test -f a.txt && sleep 2 && echo b > b.txt"
depends_on = ["a"]
[[subtask]]
id = "c"
title = "c on a"
command = "test -f a.txt && sleep 2 && echo c > c.txt"
depends_on = ["a"]
[[subtask]]
id = "d"
title = "d on b and c"
command = "cat a.txt b.txt c.txt > d.txt"
depends_on = ["b", "c"]
"""


def plan(*entries: str, head: str = "") -> str:
    return head + "\n".join(f"[[subtask]]\n{e}\n" for e in entries)


# --- the plan and the scheduler (no Docker) --------------------------------------------------------


def test_a_cycle_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"cycle: a -> b -> a"):
        ultrawork.parse_toml(plan('id = "a"\ncommand = "x"\ndepends_on = ["b"]',
                                  'id = "b"\ncommand = "x"\ndepends_on = ["a"]'))
    with pytest.raises(InvalidInput, match=r"cycle: x -> x"):
        ultrawork.parse_toml(plan('id = "x"\ncommand = "x"\ndepends_on = ["x"]'))


@pytest.mark.parametrize("text, message", [
    (plan('id = "a"\ncommand = "x"', 'id = "a"\ncommand = "y"'), "duplicate sub-task id 'a'"),
    (plan('id = "a"\ncommand = "x"\ndepends_on = ["zz"]'), "depends on unknown id 'zz'"),
    (plan('id = "A_1"\ncommand = "x"'), "id must be lowercase"),
    (plan('id = "a"'), "agent shell needs a command"),
    (plan('id = "a"\ncommand = "x"\nbogus = 1'), "unknown key"),
    (plan('id = "a"\ncommand = "x"', head='timeout = "soon"\n'), "not a duration"),
    ("parallel = 2\n", "no [[subtask]] entries"),
    ("[[subtask]\n", "not valid TOML"),
    (plan('id = "a"\ncommand = "x"\nnetwork = "everywhere"'), "network 'everywhere' is not one of"),
    (plan('id = "a"\ncommand = "x"', head="cpus = -1\n"), "cpus -1 must be a positive number"),
])
def test_invalid_plans_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        ultrawork.parse_toml(text)


def test_plan_fields_and_order() -> None:
    p = ultrawork.parse_toml(DIAMOND.replace("parallel = 2", 'parallel = 3\ntimeout = "2m"'))
    assert p.parallel == 3 and p.order() == ["a", "b", "c", "d"]
    assert [s.timeout for s in p.subtasks] == [120.0] * 4
    assert p.subtasks[3].depends_on == ("b", "c")


def _rows(**status: str) -> list[dict[str, object]]:
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []}
    return [{"id": k, "status": v, "depends_on": deps[k]} for k, v in status.items()]


def test_decisions_follow_merges_and_the_limit() -> None:
    d = ultrawork.decide(_rows(a="pending", b="pending", c="pending", d="pending", e="pending"), 1)
    assert d.start == ["a"] and "e" in d.waiting and not d.done
    d = ultrawork.decide(_rows(a="succeeded", b="pending", c="pending", d="pending", e="running"), 4)
    assert d.merge == ["a"] and d.start == []  # b and c wait for a's merge, not its success
    d = ultrawork.decide(_rows(a="merged", b="pending", c="pending", d="pending", e="running"), 2)
    assert d.start == ["b"] and d.waiting == ["c", "d"]
    d = ultrawork.decide(_rows(a="merged", b="conflict", c="merged", d="pending", e="merged"), 2)
    assert d.block == {"d": "b"}
    d = ultrawork.decide(_rows(a="failed", b="blocked", c="blocked", d="blocked", e="merged"), 2)
    assert d.done
    d = ultrawork.decide(_rows(a="succeeded", b="pending", c="pending", d="pending", e="merged"), 2, merge=False)
    assert d.done and d.merge == []  # --no-merge: dependents wait for a later run


# --- real runs --------------------------------------------------------------------------------------


def _plan_file(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _merges(svc: TaskService, parent_id: str) -> list[dict[str, str]]:
    """The parent branch's merge commits (subject, parents), as the user's repository has them."""
    task = svc.get(parent_id)
    out = git(Path(task.repo_path), "log", "--merges", "--format=%H %P%x00%s%x00%b%x1e", task.branch)
    rows = []
    for rec in out.split("\x1e"):
        if rec.strip():
            head, subject, body = rec.strip().split("\x00")
            rows.append({"commit": head.split()[0], "parents": head.split()[1:], "subject": subject, "body": body})
    return rows


def test_diamond_merges_in_dependency_order_and_runs_in_parallel(svc: TaskService, repo: Path,
                                                                  tmp_path: Path) -> None:
    parent = svc.create_task(repo, "diamond parent")
    r = run_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, DIAMOND)), "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert [s["status"] for s in data["subtasks"]] == ["merged"] * 4
    ws = Path(parent.workspace_path)
    assert (ws / "d.txt").read_text() == "a\nb\nc\n"  # d saw the merged work of b and c
    # one --no-ff merge commit per sub-task on the parent's branch, fetched into the user's repository
    merges = _merges(svc, parent.id)
    assert len(merges) == 4 and all(len(m["parents"]) == 2 for m in merges)
    assert sorted(m["subject"].split(":")[1].split()[-1] for m in merges) == ["a", "b", "c", "d"]
    rows = {s["id"]: s for s in data["subtasks"]}
    assert {m["commit"] for m in merges} == {s["merge_commit"] for s in rows.values()}
    # each sub-task is a real child task: parent id set, its own container (stopped), completed
    for s in rows.values():
        child = svc.get(s["task_id"])
        assert child.parent_id == parent.id and child.task_type == "subtask" and str(child.status) == "completed"
        assert child.container_id and child.container_id != parent.container_id
        assert svc.sandbox.state(child.container_id).value != "running"
    # real parallelism: b's and c's recorded executions overlap in time
    windows = {}
    for sid in ("b", "c"):
        ex = svc.executions(rows[sid]["task_id"])[-1]
        windows[sid] = (ex["ts"] - ex["duration_ms"] / 1000, ex["ts"])
    assert windows["b"][0] < windows["c"][1] and windows["c"][0] < windows["b"][1], windows
    # the parent's Plan.md shows the live table; every transition is an event
    text = (ws / "Plan.md").read_text()
    assert "## Sub-tasks" in text and "| d | d on b and c | merged |" in text
    types = [e["type"] for e in svc.registry.events(parent.id)]
    for kind in ("subtasks.created", "ultrawork.started", "subtask.started", "subtask.succeeded", "subtask.merged",
                 "ultrawork.finished"):
        assert kind in types, kind
    assert types.count("subtask.merged") == 4
    st = run_cli("subtask-status", parent.id)
    assert st.returncode == 0 and "4/4 finished, 4 merged" in st.stdout


def test_a_cycle_is_rejected_with_nothing_created(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    parent = svc.create_task(repo, "cycle parent", lazy=True)
    text = plan('id = "a"\ncommand = "true"\ndepends_on = ["c"]', 'id = "b"\ncommand = "true"\ndepends_on = ["a"]',
                'id = "c"\ncommand = "true"\ndepends_on = ["b"]')
    r = run_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, text)))
    assert r.returncode == 2 and "a -> c -> b -> a" in r.stderr and "Traceback" not in r.stderr
    assert svc.registry.subtasks(parent.id) == []
    assert [t.id for t in svc.list_tasks()] == [parent.id]


def test_non_shell_agents_are_refused_clearly(svc: TaskService, repo: Path) -> None:
    parent = svc.create_task(repo, "agent parent", lazy=True)
    with pytest.raises(InvalidInput, match="taskbox run"):
        svc.create_subtasks(parent.id, {"agent": "opencode", "subtask": [{"id": "a", "prompt": "do it"}]})
    assert svc.registry.subtasks(parent.id) == []


def test_the_plan_overrides_the_parents_sandbox(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    """Sub-tasks get the parent's image, limits and network unless the plan (or their entry) says otherwise."""
    parent = svc.create_task(repo, "override parent", memory="512m", cpus=1.0)
    text = plan('id = "plain"\ncommand = "true"',
                'id = "small"\ncommand = "true"\nmemory = "256m"\ncpus = 0.5',
                head='memory = "384m"\n')
    r = run_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, text)), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {s["id"]: s for s in svc.registry.subtasks(parent.id)}
    plain, small = svc.get(rows["plain"]["task_id"]), svc.get(rows["small"]["task_id"])
    assert (plain.memory_limit, plain.cpu_limit) == ("384m", 1.0)  # the plan's memory, the parent's cpus
    assert (small.memory_limit, small.cpu_limit) == ("256m", 0.5)  # its own entry wins
    assert plain.network == small.network == parent.network and plain.image == parent.image
    # a limit past the settings' caps is refused when the sub-task is made, like any create
    bad = plan('id = "huge"\ncommand = "true"\nmemory = "256g"')
    other = svc.create_task(repo, "capped parent")
    r = run_cli("ultrawork", other.id, "--plan", str(_plan_file(tmp_path, bad)), "--json", timeout=300)
    assert r.returncode != 0 and [s["status"] for s in svc.registry.subtasks(other.id)] == ["failed"]


def test_a_failure_blocks_only_its_dependents(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    parent = svc.create_task(repo, "failing parent")
    text = plan('id = "bad"\ncommand = "echo partial > p.txt; exit 3"',
                'id = "after"\ncommand = "true"\ndepends_on = ["bad"]',
                'id = "later"\ncommand = "true"\ndepends_on = ["after"]',
                'id = "free"\ncommand = "echo free > free.txt"',
                'id = "slow"\ncommand = "sleep 2; echo t"\ntimeout = "1s"')
    r = run_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, text)), "--json", timeout=300)
    assert r.returncode == 1, r.stderr
    status = {s["id"]: s["status"] for s in json.loads(r.stdout)["subtasks"]}
    assert status == {"bad": "failed", "after": "blocked", "later": "blocked", "free": "merged", "slow": "timed_out"}
    ws = Path(parent.workspace_path)
    assert (ws / "free.txt").read_text() == "free\n" and not (ws / "p.txt").exists()
    rows = {s["id"]: s for s in svc.registry.subtasks(parent.id)}
    assert rows["bad"]["exit_code"] == 3 and rows["after"]["error"] == "blocked by bad"
    assert rows["after"]["task_id"] is None  # never created
    assert str(svc.get(rows["bad"]["task_id"]).status) == "failed"


def _work_files(ws: Path) -> dict[str, str]:
    """Every file of a workspace but taskbox's own bookkeeping and .git, by content hash."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws).as_posix()
        if rel.split("/")[0] in (".git", ".task-memory", "Plan.md") or not p.is_file():
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_a_conflict_changes_nothing_and_names_the_file(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    parent = svc.create_task(repo, "conflict parent")
    text = plan('id = "one"\ncommand = "echo one > README.md; echo x > one.txt"',
                'id = "two"\ncommand = "sleep 2; echo two > README.md; echo y > two.txt"',
                'id = "needs-two"\ncommand = "true"\ndepends_on = ["two"]', head="parallel = 2\n")
    res = svc.create_subtasks(parent.id, ultrawork.parse_toml(text))
    assert res["total"] == 3
    res = svc.run_subtasks(parent.id)
    status = {s["id"]: s for s in res["subtasks"]}
    assert status["one"]["status"] == "merged"
    assert status["two"]["status"] == "conflict" and status["two"]["conflict_files"] == ["README.md"]
    assert status["needs-two"]["status"] == "blocked"
    ws = Path(parent.workspace_path)
    assert (ws / "README.md").read_text() == "one\n" and not (ws / "two.txt").exists()
    assert "conflict: README.md" in (ws / "Plan.md").read_text()
    # the merge again, byte for byte: the parent's branch, index and work files are unchanged by it
    head = (ws / ".git" / "refs" / "heads" / parent.branch).read_bytes() if (
        ws / ".git" / "refs" / "heads" / parent.branch).exists() else b""
    with svc.in_sandbox(svc.get(parent.id)) as run:
        before_tip = run(["git", "rev-parse", "HEAD"]).stdout
        before_index = run(["git", "ls-files", "-s"]).stdout
    before = _work_files(ws)
    r = run_cli("merge", status["two"]["task_id"], "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    assert json.loads(r.stdout)["conflict_files"] == ["README.md"]
    with svc.in_sandbox(svc.get(parent.id)) as run:
        assert run(["git", "rev-parse", "HEAD"]).stdout == before_tip
        assert run(["git", "ls-files", "-s"]).stdout == before_index
        assert run(["git", "status", "--porcelain", "--", ".", ":!Plan.md", ":!.task-memory"]).stdout == b""
    assert _work_files(ws) == before
    if head:
        assert (ws / ".git" / "refs" / "heads" / parent.branch).read_bytes() == head
    assert not (ws / ".git" / "taskbox-incoming.bundle").exists()
    # fixed in the sub-task, the merge goes through; the blocked dependent runs on --resume
    child = status["two"]["task_id"]
    svc.exec(child, "git merge -q -X theirs --no-edit $(git rev-parse HEAD) >/dev/null; echo one > README.md")
    merged = svc.merge_task(child)
    assert merged["status"] == "merged" and (ws / "two.txt").read_text() == "y\n"
    assert svc.registry.subtask(parent.id, "two")["status"] == "merged"
    res = svc.run_subtasks(parent.id, resume=True)
    assert {s["id"]: s["status"] for s in res["subtasks"]}["needs-two"] == "merged"


def test_merge_into_a_branch_of_the_users_repository(svc: TaskService, repo: Path) -> None:
    git(repo, "branch", "feature")
    git(repo, "branch", "other")
    (repo / "untracked.txt").write_text("mine\n")
    task = svc.create_task(repo, "standalone work")
    svc.exec(task.id, "echo work > work.txt && echo changed > README.md")
    before_head = git(repo, "rev-parse", "HEAD")
    res = svc.merge_task(task.id, "feature")
    assert res["status"] == "merged" and res["into_type"] == "branch"
    parents = git(repo, "rev-list", "--parents", "-n", "1", "feature").split()
    assert parents[0] == res["commit"] and len(parents) == 3
    assert git(repo, "show", "feature:work.txt") == "work\n"
    assert "Plan.md" not in git(repo, "ls-tree", "--name-only", "feature")  # bookkeeping stays off
    # the user's work tree and checked-out branch were not touched
    assert git(repo, "rev-parse", "HEAD") == before_head and (repo / "untracked.txt").read_text() == "mine\n"
    assert not (repo / "work.txt").exists()
    again = svc.merge_task(task.id, "feature")
    assert again["status"] == "already" and git(repo, "rev-parse", "feature").strip() == res["commit"]
    squashed = svc.merge_task(task.id, "other", squash=True)
    assert len(git(repo, "rev-list", "--parents", "-n", "1", "other").split()) == 2
    assert squashed["status"] == "merged"
    # a conflicting branch is reported and left where it was
    git(repo, "checkout", "-q", "-b", "clash")
    (repo / "README.md").write_text("theirs\n")
    git(repo, "commit", "-qam", "clash")
    git(repo, "checkout", "-q", "main")
    clash = git(repo, "rev-parse", "clash")
    r = run_cli("merge", task.id, "--into", "clash")
    assert r.returncode == 4 and "README.md" in r.stdout and git(repo, "rev-parse", "clash") == clash
    r = run_cli("merge", task.id, "--into", "main")  # checked out: refused
    assert r.returncode == 7 and "checked out" in r.stderr
    assert git(repo, "rev-parse", "HEAD") == before_head


def test_bookkeeping_on_a_branch_is_not_merged(svc: TaskService, repo: Path) -> None:
    """Tasks that keep Plan.md and memory on their branch: a merge brings the work, never the
    source's bookkeeping (both sides added their own Plan.md: merged as is, they would conflict)."""
    target = svc.create_task(repo, "bookkeeping target", memory_on_branch=True)
    source = svc.create_task(repo, "bookkeeping source", memory_on_branch=True)
    svc.exec(source.id, "echo work > work.txt")
    res = svc.merge_task(source.id, target.id)
    assert res["status"] == "merged", res
    ws = Path(target.workspace_path)
    assert (ws / "work.txt").read_text() == "work\n"
    assert "bookkeeping target" in (ws / "Plan.md").read_text()
    assert "bookkeeping source" not in (ws / "Plan.md").read_text()
    with svc.in_sandbox(svc.get(target.id)) as run:
        merged_plan = run(["git", "show", f"{res['commit']}:Plan.md"]).stdout.decode()
        state = json.loads(run(["git", "show", f"{res['commit']}:.task-memory/state.json"]).stdout)
    assert "bookkeeping target" in merged_plan and "bookkeeping source" not in merged_plan
    assert state["task_id"] == target.id


def test_merges_in_one_go_are_each_their_own(svc: TaskService, repo: Path) -> None:
    """Several task commits merged in one sandbox command (the orchestrator merges what is queued
    together): in order, one --no-ff commit each, a conflict changing nothing and the next going on."""
    target = svc.create_task(repo, "batch target")
    sources = {}
    for name, command in (("one", "echo one > README.md"), ("mid", "echo mid > mid.txt"),
                          ("two", "echo two > README.md"), ("last", "echo last > last.txt")):
        task = svc.create_task(repo, f"batch {name}")
        svc.exec(task.id, command)
        sources[name] = (task, svc.sync(task.id).commit)
    done, error = svc._merge_many_into_task(svc.get(target.id), [(t, tip, f"merge {n}") for n, (t, tip) in
                                                                 sources.items()])
    assert error is None, (done, error)
    assert [o.status for o in done] == ["merged", "merged", "conflict", "merged"]
    assert done[2].files == ["README.md"] and done[2].commit is None
    ws = Path(target.workspace_path)
    assert (ws / "README.md").read_text() == "one\n" and (ws / "last.txt").read_text() == "last\n"
    with svc.in_sandbox(svc.get(target.id)) as run:
        chain = run(["git", "log", "--first-parent", "--format=%H %P%x00%s", "-3"]).stdout.decode().splitlines()
        status = run(["git", "status", "--porcelain", "--", ".", ":!Plan.md", ":!.task-memory"]).stdout
    heads = [line.split("\0") for line in chain]
    assert [subject for _h, subject in heads] == ["merge last", "merge mid", "merge one"]
    assert [h.split()[0] for h, _s in heads] == [done[3].commit, done[1].commit, done[0].commit]
    assert all(len(h.split()) == 3 for h, _s in heads)  # --no-ff: two parents each
    assert heads[0][0].split()[1] == done[1].commit and heads[1][0].split()[1] == done[0].commit
    assert status == b""
    again, error = svc._merge_many_into_task(svc.get(target.id), [(t, tip, "again") for t, tip in sources.values()])
    assert error is None and [o.status for o in again] == ["already", "already", "conflict", "already"]


def _running_children(svc: TaskService, parent_id: str) -> list[str]:
    ids = {t.id for t in svc.list_tasks() if t.parent_id == parent_id}
    out = []
    for c in svc.sandbox.api.containers(filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
        if c["Labels"].get(LABEL_TASK) in ids:
            out.append(c["Labels"][LABEL_TASK])
    return out


def _start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "taskbox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def test_an_unexpected_error_in_the_merge_thread_ends_the_run(svc: TaskService, repo: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges run on a thread of their own: an error there reaches the caller (no run left waiting
    for a merge that never comes), and nothing is left running."""
    parent = svc.create_task(repo, "merge error parent")
    svc.create_subtasks(parent.id, {"subtask": [{"id": "a", "command": "echo a > a.txt"}]})

    def broken(self: TaskService, parent: object, rows: object) -> list[str]:
        raise RuntimeError("the merge broke")

    monkeypatch.setattr(TaskService, "_merge_subtasks", broken)
    with pytest.raises(RuntimeError, match="the merge broke"):
        svc.run_subtasks(parent.id)
    status = svc.subtask_status(parent.id)
    assert status["run"]["status"] == "finished" and status["subtasks"][0]["status"] == "succeeded"
    assert _running_children(svc, parent.id) == []  # the child's container was stopped, its task kept
    assert str(svc.get(status["subtasks"][0]["task_id"]).status) == "paused"
    monkeypatch.undo()
    res = svc.run_subtasks(parent.id)  # the next run merges it
    assert res["subtasks"][0]["status"] == "merged" and (Path(parent.workspace_path) / "a.txt").exists()


def test_resume_after_sigkill_mid_run(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    parent = svc.create_task(repo, "killed parent")
    text = plan('id = "quick"\ncommand = "echo q > q.txt"',
                'id = "long"\ncommand = "sleep 4; echo l > l.txt"',
                'id = "last"\ncommand = "cat q.txt l.txt > last.txt"\ndepends_on = ["quick", "long"]')
    proc = _start_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, text)))
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = {r["id"]: r for r in svc.registry.subtasks(parent.id)}
        if rows.get("quick", {}).get("status") == "merged" and rows["long"]["status"] == "running" \
                and rows["long"]["task_id"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the run never got to the middle")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert svc.subtask_status(parent.id)["run"]["status"] == "interrupted"
    r = run_cli("ultrawork", parent.id, "--plan", str(tmp_path / "plan.toml"))
    assert r.returncode == 4 and "already has sub-tasks" in r.stderr
    r = run_cli("ultrawork", parent.id)
    assert r.returncode == 2 and "--resume" in r.stderr
    # the doctor reports the interrupted run and, with --fix, leaves no sub-task container running
    assert _running_children(svc, parent.id)  # the killed run's sub-task container still runs
    found = [f for f in svc.doctor() if f["kind"] == "ultrawork-interrupted"]
    assert found and found[0]["task_id"] == parent.id and "--resume" in found[0]["detail"]
    fixed = [f for f in svc.doctor(fix=True) if f["kind"] == "ultrawork-interrupted"]
    assert fixed and fixed[0]["fixed"], fixed
    assert _running_children(svc, parent.id) == []
    r = run_cli("ultrawork", parent.id, "--resume", "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {s["id"]: s for s in json.loads(r.stdout)["subtasks"]}
    assert all(s["status"] == "merged" for s in rows.values())
    assert (Path(parent.workspace_path) / "last.txt").read_text() == "q\nl\n"
    # nothing merged twice, nothing finished redone, no container left running
    subjects = [m["subject"] for m in _merges(svc, parent.id)]
    assert sorted(subjects) == sorted(set(subjects)) and len(subjects) == 3
    quick_runs = [e for e in svc.registry.events(parent.id) if e["type"] == "subtask.started"
                  and e["payload"]["subtask"] == "quick"]
    assert len(quick_runs) == 1
    recovered = [e["payload"] for e in svc.registry.events(parent.id) if e["type"] == "ultrawork.recovered"]
    assert recovered and recovered[0]["subtask"] == "long"
    assert _running_children(svc, parent.id) == []
    children = {t.id: str(t.status) for t in svc.list_tasks() if t.parent_id == parent.id}
    assert [k for k, v in children.items() if v == "aborted"] == [recovered[0]["task_id"]]
    assert sorted(v for v in children.values()) == ["aborted", "completed", "completed", "completed"]


def test_resume_after_sigkill_mid_merge(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    parent = svc.create_task(repo, "merge killed parent")
    text = plan('id = "only"\ncommand = "echo o > o.txt"', 'id = "next"\ncommand = "cat o.txt > n.txt"\n'
                'depends_on = ["only"]')
    r = run_cli("ultrawork", parent.id, "--plan", str(_plan_file(tmp_path, text)),
                env={"TASKBOX_CRASH_AT": "ultrawork.merged"}, timeout=300)
    assert r.returncode == -signal.SIGKILL
    row = svc.registry.subtask(parent.id, "only")
    assert row["status"] == "succeeded"  # the branch moved, the registry does not know it yet
    r = run_cli("ultrawork", parent.id, "--resume", "--json", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {s["id"]: s for s in json.loads(r.stdout)["subtasks"]}
    assert rows["only"]["status"] == rows["next"]["status"] == "merged"
    assert len(_merges(svc, parent.id)) == 2  # the interrupted merge was recognised, not made twice
    merged = [e["payload"] for e in svc.registry.events(parent.id) if e["type"] == "subtask.merged"]
    assert {m["subtask"]: m["already"] for m in merged} == {"only": True, "next": False}
    assert _running_children(svc, parent.id) == []
    # the doctor sees a sound state now
    assert not [f for f in svc.doctor() if f["kind"].startswith("ultrawork")]


def test_merging_a_hostile_subtask_runs_nothing_on_the_host(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    marker = tmp_path / "host-marker"
    # every program the repository names leaves the marker (where it can) and otherwise behaves,
    # so the sub-task itself works; the host must run none of them
    run = f"mkdir -p {marker.parent} 2>/dev/null; touch {marker} 2>/dev/null"
    evil = (f"git config filter.evil.clean '{run}; cat'; git config filter.evil.smudge '{run}; cat'; "
            f"git config filter.evil.required true; git config core.fsmonitor '{run}; true'; "
            f"git config merge.evil.driver '{run}; true'; git config core.hooksPath hooks; mkdir -p hooks; "
            f"for h in pre-commit post-merge post-checkout reference-transaction pre-auto-gc; do "
            f"printf '#!/bin/sh\\n{run}\\n' > hooks/$h; chmod +x hooks/$h; cp hooks/$h .git/hooks/$h; done; "
            "printf '* filter=evil merge=evil diff=evil\\n' > .gitattributes; git config diff.evil.textconv "
            f"'{run}; cat'; echo payload > payload.txt")
    parent = svc.create_task(repo, "hostile parent")
    svc.create_subtasks(parent.id, {"subtask": [{"id": "evil", "command": evil}]})
    res = svc.run_subtasks(parent.id)
    assert res["subtasks"][0]["status"] == "merged", res["subtasks"][0]["error"]
    assert (Path(parent.workspace_path) / "payload.txt").read_text() == "payload\n"
    child = res["subtasks"][0]["task_id"]
    git(repo, "branch", "target")
    assert svc.merge_task(child, "target")["status"] in ("merged", "already")
    assert git(repo, "show", "target:payload.txt") == "payload\n"
    assert not marker.exists()
    assert "evil" not in git(repo, "config", "--list")
