"""Adversarial tests for checkpoints: the agent swaps directories for links to host paths.

Everything under a workspace is the agent's at every instant. A checkpoint walks it and a
restore rewrites it on the host, as root; neither may follow a link out of it — not the one
that was there when the walk began, and not one swapped in a moment later (issue 9).
Every check hashes the host directories the links point at, before and after.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from taskbox import TaskboxError, TaskService
from taskbox.checkpoints import Checkpoints
from taskbox.confine import SANDBOX_UID

from .conftest import run_cli
from .test_checkpoints import differences, manifest

SECRET = "TASKBOX_CANARY_SECRET_5f3a9c"
NESTED = ("mkdir -p vendor/lib && cd vendor/lib && git init -q -b main && echo 'v = 1' > lib.py "
          "&& git add . && git -c user.name=a -c user.email=a@a commit -qm lib")


def canary(tmp_path: Path) -> Path:
    """A host directory outside every workspace, with secrets and a repository of its own."""
    c = tmp_path / "canary"
    (c / ".git" / "refs").mkdir(parents=True)
    (c / ".env").write_text(f"API_KEY={SECRET}\n")
    (c / "notes.txt").write_text("host notes\n")
    (c / ".git" / "config").write_text(f"[core]\n\tsecret = {SECRET}\n")
    (c / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return c


def store_holds(svc: TaskService, task_id: str, needle: str) -> bool:
    """Whether any object in the task's checkpoint store contains ``needle`` (contents inflated)."""
    store = svc.checkpoints.store(task_id).path
    out = subprocess.run(["git", "--git-dir", str(store), "cat-file", "--batch-all-objects", "--batch"],
                         capture_output=True, check=True).stdout
    return needle.encode() in out


@pytest.mark.parametrize("swapped, to", [
    ("vendor/lib", "repo"),  # the issue: a nested repository becomes a link to the user's repository
    ("vendor/lib/.git", "repo/.git"),  # only its .git does
    (".git", "repo/.git"),  # the workspace's own .git does
    ("vendor", "canary"),  # a parent of the nested repository becomes a link to a host directory
])
def test_restore_through_a_swapped_link_leaves_the_host_untouched(svc: TaskService, repo: Path, tmp_path: Path,
                                                                  swapped: str, to: str) -> None:
    host = canary(tmp_path)
    task = svc.create_task(repo, "nested swap")
    ws = Path(task.workspace_path)
    svc.exec(task.id, NESTED)
    cp = svc.create_checkpoint(task.id, "with-lib")
    want = manifest(ws)
    target = tmp_path / to
    user, canary_before = manifest(repo), manifest(host)
    svc.exec(task.id, f"rm -rf {swapped} && ln -s {target} {swapped}")
    assert os.path.islink(ws / swapped)

    res = svc.restore_checkpoint(task.id, cp["checkpoint_id"])

    assert res.checkpoint_id and res["files_restored"] >= 0
    assert manifest(repo) == user  # the user's .git, byte for byte, every file
    assert manifest(host) == canary_before
    assert differences(want, manifest(ws)) == []  # the real nested repository is back
    assert not os.path.islink(ws / "vendor" / "lib") and (ws / "vendor" / "lib" / ".git").is_dir()
    assert svc.exec(task.id, "git -C vendor/lib log --format=%s").stdout == "lib\n"


def test_a_checkpoint_after_the_swap_stores_links_never_what_they_point_at(svc: TaskService, repo: Path,
                                                                        tmp_path: Path) -> None:
    host = canary(tmp_path)
    before = manifest(host)
    task = svc.create_task(repo, "capture swap")
    ws = Path(task.workspace_path)
    svc.exec(task.id, NESTED)
    first = svc.create_checkpoint(task.id, "first")
    # every way in: a nested repository, a nested .git, the workspace's .git, a plain file link
    svc.exec(task.id, f"rm -rf vendor/lib && ln -s {host} vendor/lib && mkdir -p x && ln -s {host}/.git x/.git "
                      f"&& ln -s {host}/.env env && mkdir -p y && ln -s {host} y/.git")
    after = svc.create_checkpoint(task.id, "after-swap")
    assert not store_holds(svc, task.id, SECRET)  # not one blob holds the host's secret
    assert manifest(host) == before

    # the links came back as links (the host path only as their target string), nothing followed
    svc.restore_checkpoint(task.id, first["checkpoint_id"])
    svc.restore_checkpoint(task.id, after["checkpoint_id"])
    assert os.readlink(ws / "vendor" / "lib") == str(host) and os.readlink(ws / "env") == f"{host}/.env"
    assert os.readlink(ws / "x" / ".git") == f"{host}/.git"
    assert manifest(host) == before and not store_holds(svc, task.id, SECRET)


def test_a_directory_and_a_host_link_swapped_in_a_tight_loop(svc: TaskService, repo: Path, tmp_path: Path,
                                                             docker_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    host = canary(tmp_path)
    before = manifest(host)
    around = sorted(os.listdir(tmp_path))
    task = svc.create_task(repo, "swap race")
    ws = Path(task.workspace_path)
    svc.exec(task.id, "mkdir -p d/sub && echo one > d/f && echo x > d/sub/x && ln -s f d/self")
    # A frozen container cannot race; the host must be safe without that, so no freezing here.
    monkeypatch.setattr(Checkpoints, "_frozen", lambda self, task: contextlib.nullcontext(False))
    a = svc.create_checkpoint(task.id, "a")
    svc.exec(task.id, "echo two > d/f && echo marker > d/marker && rm -rf d/sub && mkdir d/new")
    b = svc.create_checkpoint(task.id, "b")
    # The container cannot even see these paths: only the host would resolve the link.
    loop = (f"echo $$ > /tmp/swap.pid; cd /workspace; while true; do mv d d.real; ln -s {host} d; rm d; "
            f"mv d.real d; ln -s {host} d/sub; rm d/sub; done >/dev/null 2>&1")
    exec_id = docker_engine.api.exec_create(task.container_id, ["sh", "-c", loop], user=f"{SANDBOX_UID}")["Id"]
    docker_engine.api.exec_start(exec_id, detach=True)
    ok = failed = 0
    deadline = time.monotonic() + 180
    try:
        for i in range(50):
            if time.monotonic() > deadline:
                break
            for op in (lambda: svc.create_checkpoint(task.id),
                       lambda i=i: svc.restore_checkpoint(task.id, (a if i % 2 else b)["checkpoint_id"])):
                try:
                    op()
                    ok += 1
                except TaskboxError:  # "kept changing": a refusal is fine, a followed link is not
                    failed += 1
                assert manifest(host) == before
    finally:
        svc.exec(task.id, "kill $(cat /tmp/swap.pid)")
    for _ in range(50):
        if not docker_engine.api.exec_inspect(exec_id)["Running"]:
            break
        time.sleep(0.1)
    assert not docker_engine.api.exec_inspect(exec_id)["Running"]
    assert ok >= 50, f"{ok} operations succeeded, {failed} refused"
    # Quiet again: a restore (finishing any interrupted one first) is whole and exact.
    svc.restore_checkpoint(task.id, b["checkpoint_id"])
    assert (ws / "d" / "marker").read_text() == "marker\n" and os.readlink(ws / "d" / "self") == "f"
    assert manifest(host) == before
    assert sorted(os.listdir(tmp_path)) == around  # nothing was made beside the canary either
    assert not store_holds(svc, task.id, SECRET)


def test_an_interrupted_restore_is_finished_whole_owner_and_modes_included(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "replay restore")
    ws = Path(task.workspace_path)
    svc.exec(task.id, "mkdir -p src/deep priv empty && echo a > src/a.py && echo b > src/deep/b.py "
                      "&& printf '#!/bin/sh\\n' > run.sh && chmod 755 run.sh && echo s > priv/key && chmod 600 priv/key "
                      "&& chmod 700 priv && ln -s src/a.py link && git add -A && git commit -qm A")
    a = svc.create_checkpoint(task.id, "A")
    want = manifest(ws)
    svc.exec(task.id, "echo changed > src/a.py && rm -rf src/deep && echo new > new.txt && chmod 644 priv/key "
                      "&& git add -A && git commit -qm B")
    # Left by the host as root (an older restore did that): right content, wrong owner and mode.
    for rel in ("run.sh", "src", "priv/key", "empty"):
        os.chown(ws / rel, 0, 0)
    os.chmod(ws / "run.sh", 0o700)
    os.chown(ws / "link", 0, 0, follow_symlinks=False)

    r = run_cli("restore-checkpoint", task.id, "-c", a["checkpoint_id"], env={"TASKBOX_CRASH_AT": "restore.midway"})
    assert r.returncode == -9, r.stderr  # really killed, half-way
    # The killed run already restored these; they are spoilt again before the replay.
    os.chown(ws / "src" / "a.py", 0, 0)
    os.chmod(ws / "src" / "a.py", 0o666)
    findings = json.loads(run_cli("doctor", "--fix", "--json").stdout)
    fixed = [f for f in findings if f["kind"] == "interrupted-restore" and f["task_id"] == task.id]
    assert fixed and fixed[0]["fixed"]

    got = manifest(ws)
    assert differences(want, got) == []  # contents, modes (0600 key, 0700 dir, 0755 script) and owners
    assert {v[2] for v in got.values()} == {SANDBOX_UID}  # (kind, mode or target, uid, …)
    assert svc.exec(task.id, "git log --format=%s | head -1 && cat priv/key").stdout == "A\ns\n"
    # and once more changes nothing: the replay was complete
    svc.restore_checkpoint(task.id, a["checkpoint_id"])
    assert differences(want, manifest(ws)) == []


