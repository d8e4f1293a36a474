"""Checkpoints on real git, Docker and awkward workspaces: restore is byte-exact.

Every restore is checked against a full manifest of the workspace (paths, types, modes,
owners, link targets, SHA-256 of contents), ``.git`` included. Left out by design: the
append-only history in ``.task-memory/`` (kept across a restore) and ``state.json``, whose
``current_checkpoint`` moves to the restored checkpoint (its todos are compared instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskbox import CheckpointCorrupted, NotFound, TaskLocked, TaskService
from taskbox.workspace import hand_over

from .conftest import git

SKIP = {".task-memory/conversations.jsonl", ".task-memory/executions.jsonl", ".task-memory/decisions.md",
        ".task-memory/state.json"}


def manifest(root: Path) -> dict[str, Any]:
    """Everything observable about a tree, links never followed."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if rel in SKIP:
                continue
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_uid)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_uid)
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                out[rel] = ("file", mode, st.st_uid, st.st_size, h.hexdigest())
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def todos(ws: Path) -> list[dict[str, Any]]:
    return json.loads((ws / ".task-memory" / "state.json").read_text())["todos"]


def test_awkward_workspace_round_trips_exactly(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    task = svc.create_task(repo, "awkward workspace")
    ws = Path(task.workspace_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host file")
    # unicode and spaces, exec bits, links (inside, dangling, pointing out), empty dirs,
    # an ignored dependency folder, a 50 MB binary and 10k small files
    (ws / "ünïcödé dir" / "with space").mkdir(parents=True)
    (ws / "ünïcödé dir" / "with space" / "naïve file.txt").write_text("unicode ✓\n")
    (ws / "run me.sh").write_text("#!/bin/sh\necho ran\n")
    (ws / "run me.sh").chmod(0o755)
    os.symlink("ünïcödé dir/with space/naïve file.txt", ws / "inside-link")
    os.symlink("does/not/exist", ws / "dangling-link")
    os.symlink(str(outside), ws / "outside-dir-link")
    os.symlink(str(outside / "secret.txt"), ws / "outside-file-link")
    (ws / "empty" / "deeper" / "deepest").mkdir(parents=True)
    (ws / "also-empty").mkdir()
    (ws / ".gitignore").write_text("node_modules/\n*.bin\n")
    (ws / "node_modules" / "dep").mkdir(parents=True)
    (ws / "node_modules" / "dep" / "index.js").write_text("module.exports = 1\n")
    (ws / "big.bin").write_bytes(os.urandom(50 * 2**20))
    small = ws / "many"
    for i in range(10_000):
        d = small / f"d{i % 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"small file {i}\n")
    (ws / ".gitattributes").write_text("*.txt text eol=crlf\n*.sh filter=evil\n")  # must not rewrite content
    (ws / "crlf.txt").write_bytes(b"line one\r\nline two\n")
    svc.update_todos(task.id, [{"text": "first todo"}])
    hand_over(ws)
    # no background `gc --auto`: it would keep rewriting .git after the manifests are taken
    svc.exec(task.id, "git config gc.auto 0 && git add -A && git commit -qm 'agent work'")

    a = svc.create_checkpoint(task.id, "awkward", "everything at once")
    assert a["files"] > 10_000 and a["bytes_added"] > 50 * 2**20 * 0.9
    before = manifest(ws)
    todos_a = todos(ws)
    assert any(k.startswith(".git/objects/") for k in before)  # .git is part of the comparison

    # change everything in every way
    (ws / "run me.sh").write_text("#!/bin/sh\necho changed\n")
    (ws / "ünïcödé dir" / "with space" / "naïve file.txt").chmod(0o755)
    os.unlink(ws / "outside-file-link")
    os.unlink(ws / "inside-link")
    (ws / "inside-link").write_text("a file where a link was")
    (ws / "dangling-link").unlink()
    os.symlink("somewhere/else", ws / "dangling-link")
    import shutil

    shutil.rmtree(ws / "empty")
    (ws / "empty").write_text("a file where a directory was")
    (ws / "also-empty").rmdir()
    os.symlink(str(outside), ws / "also-empty")  # a directory replaced by a link out
    (ws / "new empty dir").mkdir()
    (ws / "new file.txt").write_text("new")
    with open(ws / "big.bin", "r+b") as fh:
        fh.seek(25 * 2**20)
        fh.write(b"changed in the middle")
    for i in range(0, 10_000, 2):
        (small / f"d{i % 100:02d}" / f"f{i}.txt").unlink()
    shutil.rmtree(ws / "node_modules")
    svc.update_todos(task.id, [{"id": "t1", "status": "completed"}, {"text": "second todo"}])
    hand_over(ws)
    svc.exec(task.id, "git add -A && git commit -qm 'more work' && git tag v1 && git checkout -qb side")
    b = svc.create_checkpoint(task.id, "changed")
    after = manifest(ws)
    assert b["changes"]["deleted"] >= 5000

    res = svc.restore_checkpoint(task.id, a["checkpoint_id"])
    assert res["files_restored"] >= 5000 and res["files_removed"] >= 1
    assert differences(before, manifest(ws))[:20] == []
    assert todos(ws) == todos_a
    assert (outside / "secret.txt").read_text() == "host file" and os.listdir(outside) == ["secret.txt"]
    # the task's git state came back too: branch, history, no tag
    assert svc.exec(task.id, "git rev-parse --abbrev-ref HEAD").stdout.strip() == task.branch
    assert "more work" not in svc.exec(task.id, "git log --format=%s").stdout
    assert svc.exec(task.id, "git tag").stdout == ""
    assert svc.exec(task.id, "./'run me.sh' && cat empty/../crlf.txt | od -c | head -1").stdout.startswith("ran\n")
    assert (ws / "crlf.txt").read_bytes() == b"line one\r\nline two\n"

    svc.restore_checkpoint(task.id, b["checkpoint_id"])
    now = manifest(ws)
    assert [(k, after.get(k), now.get(k)) for k in differences(after, now)] == []
    assert svc.exec(task.id, "git rev-parse --abbrev-ref HEAD && git tag").stdout.split() == ["side", "v1"]
    assert svc.state(task.id)["current_checkpoint"] == b["checkpoint_id"]


def test_nested_repositories_are_captured_with_their_contents(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "nested repos")
    ws = Path(task.workspace_path)
    dep = ws / "vendor" / "dep"
    dep.mkdir(parents=True)
    git(dep, "init", "-q", "-b", "main")
    (dep / "lib.py").write_text("v = 1\n")
    git(dep, "add", ".")
    git(dep, "commit", "-qm", "dep")
    fresh = ws / "scratch-repo"  # a repository without any commit yet
    fresh.mkdir()
    git(fresh, "init", "-q")
    (fresh / "notes.txt").write_text("uncommitted\n")
    hand_over(ws)
    a = svc.create_checkpoint(task.id)
    before = manifest(ws)
    (dep / "lib.py").write_text("v = 2\n")
    git(dep, "-c", "safe.directory=*", "commit", "-qam", "dep 2")
    import shutil

    shutil.rmtree(fresh)
    shutil.rmtree(dep / ".git")  # the nested repository becomes a plain directory
    svc.create_checkpoint(task.id)
    svc.restore_checkpoint(task.id, a["checkpoint_id"])
    assert differences(before, manifest(ws)) == []
    assert git(dep, "-c", "safe.directory=*", "log", "--format=%s") == "dep\n"


def test_restore_after_the_container_was_removed(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "container goes away")
    svc.exec(task.id, "mkdir -p out && echo one > out/result.txt")
    a = svc.create_checkpoint(task.id)
    ws = Path(task.workspace_path)
    before = manifest(ws)
    svc.exec(task.id, "echo two > out/result.txt && touch stray")
    docker_engine.api.remove_container(task.container_id, force=True)
    res = svc.restore_checkpoint(task.id, a["checkpoint_id"])
    assert res["files_changed"] >= 1 and res["files_removed"] >= 1
    assert differences(before, manifest(ws)) == []
    svc.doctor(fix=True)  # forgets the lost container
    assert svc.exec(task.id, "cat out/result.txt; ls stray 2>&1 || true").stdout.startswith("one\n")
    assert svc.get(task.id).container_id != task.container_id


def test_restore_is_refused_while_another_agent_is_attached(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "attached agents")
    a = svc.attach(task.id, "alice", "m1")
    svc.exec(task.id, "echo v1 > f.txt")
    cp = svc.create_checkpoint(task.id, "v1")
    svc.exec(task.id, "echo v2 > f.txt")
    ws = Path(task.workspace_path)
    with pytest.raises(TaskLocked, match="alice"):
        svc.restore_checkpoint(task.id, cp["checkpoint_id"])
    assert (ws / "f.txt").read_text() == "v2\n"
    # the attached agent itself may restore its own task
    svc.restore_checkpoint(task.id, cp["checkpoint_id"], session_id=a.session.id)
    assert (ws / "f.txt").read_text() == "v1\n"
    svc.exec(task.id, "echo v3 > f.txt")
    res = svc.restore_checkpoint(task.id, "v1", force=True)  # by name, forced
    assert res["forced"] and (ws / "f.txt").read_text() == "v1\n"
    assert any("forced" in d.get("context", "") for d in svc.decisions(task.id))


def test_unknown_and_foreign_checkpoints_are_clear_errors(svc: TaskService, repo: Path) -> None:
    one = svc.create_task(repo, "task one", lazy=True)
    two = svc.create_task(repo, "task two", lazy=True)
    cp = svc.create_checkpoint(one.id)
    with pytest.raises(NotFound, match="no checkpoint 'cp-000000000000'"):
        svc.restore_checkpoint(one.id, "cp-000000000000")
    with pytest.raises(NotFound, match=f"belongs to task {one.id}, not {two.id}"):
        svc.restore_checkpoint(two.id, cp["checkpoint_id"])
    with pytest.raises(NotFound, match="no checkpoints yet"):
        svc.restore_checkpoint(two.id)
    with pytest.raises(NotFound):
        svc.checkpoint_diff(two.id, cp["checkpoint_id"], "current")
    with pytest.raises(NotFound):
        svc.create_checkpoint("no-such-task")


def test_a_damaged_store_object_is_reported_and_nothing_changes(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "corruption", lazy=True)
    ws = Path(task.workspace_path)
    (ws / "data.bin").write_bytes(os.urandom(100_000))
    wanted = subprocess.run(["git", "hash-object", str(ws / "data.bin")], capture_output=True, text=True,
                            check=True).stdout.strip()
    cp = svc.create_checkpoint(task.id)
    (ws / "data.bin").write_bytes(b"newer content")
    (ws / "extra.txt").write_text("stays until a good restore")
    store = svc.checkpoints.store(task.id).path
    obj = store / "objects" / wanted[:2] / wanted[2:]
    at = None
    if not obj.exists():  # random bytes are stored as they are, in a pack of taskbox's own: damaged there
        for idx in (store / "objects" / "pack").glob("*.idx"):
            out = subprocess.run(["git", "verify-pack", "-v", str(idx)], capture_output=True, text=True).stdout
            for line in out.splitlines():
                f = line.split()
                if f and f[0] == wanted:
                    obj, at = idx.with_suffix(".pack"), int(f[4]) + int(f[3]) // 2
    assert obj.exists()
    obj.chmod(0o644)
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2 if at is None else at] ^= 0xFF
    obj.write_bytes(bytes(raw))
    before = manifest(ws)
    with pytest.raises(CheckpointCorrupted, match="damaged.*workspace was not changed"):
        svc.restore_checkpoint(task.id, cp["checkpoint_id"])
    assert differences(before, manifest(ws)) == []
    assert not any(f["kind"] == "interrupted-restore" for f in svc.doctor())


def test_diff_list_and_retention(svc: TaskService, repo: Path) -> None:
    svc.settings.checkpoint_max_per_task = 3
    task = svc.create_task(repo, "retention", lazy=True)
    ws = Path(task.workspace_path)
    ids = []
    for i in range(6):
        (ws / f"f{i}.txt").write_text(str(i))
        name = "keep-me" if i == 1 else None
        ids.append(svc.create_checkpoint(task.id, name, pinned=(i == 2))["checkpoint_id"])
    rows = svc.list_checkpoints(task.id)
    names = [r["name"] for r in rows]
    # oldest unnamed, unpinned ones went first; named, pinned and newest stay
    assert [r["checkpoint_id"] for r in rows] == [ids[1], ids[2], ids[5]]
    assert names[0] == "keep-me" and rows[1]["pinned"] and rows[-1]["current"]
    d = svc.checkpoint_diff(task.id, ids[1], ids[5])
    paths = {c["path"]: c["status"] for c in d["changes"]}
    assert paths["f2.txt"] == paths["f5.txt"] == "added" and "f1.txt" not in paths
    assert "f5.txt" in d["patch"]
    (ws / "f0.txt").unlink()
    now = svc.checkpoint_diff(task.id, ids[5], "current")
    assert {"status": "deleted", "path": "f0.txt"} in now["changes"]
    # age: an unnamed checkpoint older than K days is pruned, never the newest
    svc.settings.checkpoint_max_age_days = 1
    svc.settings.checkpoint_max_per_task = 10
    extra = svc.create_checkpoint(task.id)["checkpoint_id"]
    with svc.registry.tx() as conn:
        conn.execute("UPDATE checkpoints SET created_at = created_at - 3 * 86400 WHERE task_id = ?", (task.id,))
    assert svc.prune_checkpoints(task.id) == [ids[5]]
    assert {r["checkpoint_id"] for r in svc.list_checkpoints(task.id)} == {ids[1], ids[2], extra}


def test_gc_reclaims_the_space_of_pruned_checkpoints(svc: TaskService, repo: Path) -> None:
    svc.settings.checkpoint_max_per_task = 1
    task = svc.create_task(repo, "gc", lazy=True)
    ws = Path(task.workspace_path)
    (ws / "blob.bin").write_bytes(os.urandom(8 * 2**20))
    first = svc.create_checkpoint(task.id)
    (ws / "blob.bin").unlink()
    second = svc.create_checkpoint(task.id)
    assert [r["checkpoint_id"] for r in svc.list_checkpoints(task.id)] == [second["checkpoint_id"]]
    assert first["checkpoint_id"] in second["pruned"]
    store = svc.checkpoints.store(task.id)
    assert store.size() > 8 * 2**20
    svc.gc()
    assert store.size() < 2 * 2**20
    # the store still works after gc (its private indexes were rebuilt)
    (ws / "after.txt").write_text("after gc")
    third = svc.create_checkpoint(task.id)
    (ws / "after.txt").unlink()
    svc.restore_checkpoint(task.id, third["checkpoint_id"])
    assert (ws / "after.txt").read_text() == "after gc"


def test_export_and_import_round_trip(svc: TaskService, repo: Path, tmp_path: Path) -> None:
    src = svc.create_task(repo, "exported", lazy=True)
    ws = Path(src.workspace_path)
    (ws / "bin").mkdir()
    (ws / "bin" / "tool").write_text("#!/bin/sh\n")
    (ws / "bin" / "tool").chmod(0o755)
    os.symlink("bin/tool", ws / "tool-link")
    (ws / "empty dir").mkdir()
    (ws / "ü.txt").write_text("ü")
    hand_over(ws)
    cp = svc.create_checkpoint(src.id, "to-share", "for another task")
    before = manifest(ws)
    out = svc.export_checkpoint(src.id, cp["checkpoint_id"], tmp_path)
    assert Path(out["path"]).name.endswith(".tar.gz")
    dst = svc.create_task(repo, "imported", lazy=True)
    imported = svc.import_checkpoint(dst.id, out["path"])
    assert imported["name"] == "to-share" and imported["trigger"] == "import"
    svc.restore_checkpoint(dst.id, imported["checkpoint_id"])
    got = manifest(Path(dst.workspace_path))
    assert differences(before, got) == []
    # exporting the import gives the same content again
    again = svc.export_checkpoint(dst.id, imported["checkpoint_id"], tmp_path / "again.tar.gz")
    assert Path(again["path"]).is_file()


def test_include_filesystem_brings_back_system_changes(svc: TaskService, repo: Path, docker_engine) -> None:
    task = svc.create_task(repo, "system packages")
    svc.exec(task.id, "echo installed > /home/agent/.marker && echo ws > in-workspace.txt")
    cp = svc.create_checkpoint(task.id, "with-fs", include_filesystem=True)
    image = cp["image"]
    try:
        assert docker_engine.images.get(image)
        svc.exec(task.id, "rm /home/agent/.marker in-workspace.txt")
        res = svc.restore_checkpoint(task.id, cp["checkpoint_id"])
        assert res["container_restored"]
        assert svc.exec(task.id, "cat /home/agent/.marker in-workspace.txt").stdout == "installed\nws\n"
        assert svc.get(task.id).image == image
    finally:
        for c in docker_engine.api.containers(all=True, filters={"ancestor": image}):
            docker_engine.api.remove_container(c["Id"], force=True)
        svc.delete_checkpoint(task.id, cp["checkpoint_id"])
    assert not docker_engine.api.images(name=image)


def test_names_that_are_not_utf8(svc: TaskService, repo: Path) -> None:
    task = svc.create_task(repo, "latin-1 names", lazy=True)
    ws = Path(task.workspace_path)
    name, empty = os.fsdecode(b"caf\xe9.txt"), os.fsdecode(b"empty\xff")
    (ws / name).write_text("latin-1 name")
    (ws / empty).mkdir()
    hand_over(ws)
    a = svc.create_checkpoint(task.id)
    before = manifest(ws)
    (ws / name).write_text("changed")
    (ws / empty).rmdir()
    changes = svc.checkpoint_diff(task.id, a["checkpoint_id"], "current")["changes"]
    assert {"status": "modified", "path": name} in changes and {"status": "deleted", "path": empty + "/"} in changes
    svc.restore_checkpoint(task.id, a["checkpoint_id"])
    assert differences(before, manifest(ws)) == []


def test_gc_with_nothing_deleted_keeps_the_stat_cache(svc, repo) -> None:
    task = svc.create_task(repo, "gc keeps caches", lazy=True)
    svc.create_checkpoint(task.id, "one")
    index = svc.paths.home / "checkpoints" / f"{task.id}.git" / "taskbox" / "index"
    before = sorted(p.name for p in index.iterdir())
    assert before
    svc.gc()
    assert sorted(p.name for p in index.iterdir()) == before  # no deletion: nothing to collect
    svc.delete_checkpoint(task.id, "one")
    svc.gc()
    assert list(index.iterdir()) == []  # objects were collected, so the caches went with them
