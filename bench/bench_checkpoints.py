"""Checkpoint benchmark: taskbox's git-object-store checkpoints against the baselines.

Run: ``python bench/bench_checkpoints.py`` (``--quick`` for a small run, ``--json`` for data).

Needs Docker and the sandbox image. For each generated workspace (1k files / 10 MB and
20k files / 200 MB; half random bytes, half text, in nested directories) it measures, in
one run:

- taskbox: first checkpoint; incremental checkpoint after changing 10 files; restore of a
  checkpoint 10 changed files back; bytes the store grew by for 10 incremental checkpoints;
- tar.gz snapshot of the same workspace (the original design): the same four numbers
  (every snapshot is a full one; restore = delete the tree and extract);
- ``docker commit`` of the task's container: time of a commit and the bytes the image
  layers add. It does not contain the workspace at all (a bind mount), so it is a
  baseline for speed only.

Targets (checked on the largest workspace; exit status 1 if one is missed): incremental
checkpoint < 300 ms, restore < 1 s, 10 incremental checkpoints store < 1.2x one full tar.gz.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import TaskService, quota  # noqa: E402
from taskbox.sandbox import LABEL_HOME  # noqa: E402
from taskbox.workspace import hand_over  # noqa: E402

TARGET_INCREMENTAL_MS = 300
TARGET_RESTORE_MS = 1000
TARGET_STORE_RATIO = 1.2


def generate(root: Path, n_files: int, total_bytes: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    per = max(1, total_bytes // n_files)
    paths = []
    for i in range(n_files):
        d = root / "src" / f"pkg{i % 97:02d}" / f"mod{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"file{i:05d}.{'bin' if i % 2 else 'txt'}"
        if i % 2:
            p.write_bytes(rng.randbytes(per))
        else:
            words = [f"token{rng.randrange(5000)}" for _ in range(per // 9 + 1)]
            p.write_bytes(" ".join(words).encode()[:per])
        paths.append(p)
    return paths


def change(paths: list[Path], rng: random.Random, count: int = 10) -> None:
    for p in rng.sample(paths, count):
        data = bytearray(p.read_bytes())
        for _ in range(8):
            data[rng.randrange(len(data))] = rng.randrange(256)
        p.write_bytes(bytes(data))


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def tar_snapshot(ws: Path, out: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    subprocess.run(["tar", "-czf", str(out), "-C", str(ws), "."], check=True)
    return ms(t0), out.stat().st_size


def tar_restore(ws: Path, archive: Path) -> float:
    t0 = time.perf_counter()
    for child in ws.iterdir():  # in place: the container bind-mounts the directory itself
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(ws)], check=True)
    return ms(t0)


def bench_one(svc: TaskService, repo: Path, scratch: Path, n_files: int, total: int) -> dict[str, Any]:
    label = f"{n_files // 1000}k files / {total // 2**20} MB" if n_files >= 1000 else f"{n_files} files"
    task = svc.create_task(repo, f"bench {n_files}")
    ws = Path(task.workspace_path)
    paths = generate(ws, n_files, total)
    hand_over(ws)
    rng = random.Random(11)
    api = svc.sandbox.api
    r: dict[str, Any] = {"workspace": label, "files": n_files, "bytes": total}

    # first (full) checkpoint
    before = du(svc.checkpoints.store(task.id).path) if svc.checkpoints.store(task.id).exists() else 0
    t0 = time.perf_counter()
    first = svc.create_checkpoint(task.id, "first")
    r["tb_first_ms"] = ms(t0)
    r["tb_first_bytes"] = du(svc.checkpoints.store(task.id).path) - before
    r["tar_first_ms"], r["tar_bytes"] = tar_snapshot(ws, scratch / "full.tar.gz")
    t0 = time.perf_counter()
    api.commit(task.container_id, repository="taskbox-bench", tag=f"{task.id}-0")
    r["dc_first_ms"] = ms(t0)

    # incremental after changing 10 files
    change(paths, rng)
    t0 = time.perf_counter()
    svc.create_checkpoint(task.id)
    r["tb_incr_ms"] = ms(t0)
    r["tar_incr_ms"], _ = tar_snapshot(ws, scratch / "incr.tar.gz")
    t0 = time.perf_counter()
    api.commit(task.container_id, repository="taskbox-bench", tag=f"{task.id}-1")
    r["dc_incr_ms"] = ms(t0)

    # restore of a checkpoint 10 changed files back
    t0 = time.perf_counter()
    res = svc.restore_checkpoint(task.id, first["checkpoint_id"])
    r["tb_restore_ms"] = ms(t0)
    r["tb_restore_changed"] = res["files_changed"]
    r["tar_restore_ms"] = tar_restore(ws, scratch / "full.tar.gz")
    hand_over(ws)
    t0 = time.perf_counter()
    cid = api.create_container(f"taskbox-bench:{task.id}-0", command=["true"])["Id"]
    r["dc_restore_ms"] = ms(t0)  # a container from the committed image (start not included)
    api.remove_container(cid, force=True)

    # bytes stored by 10 incremental checkpoints (10 changed files each)
    store = svc.checkpoints.store(task.id).path
    before = du(store)
    times = []
    for _ in range(10):
        change(paths, rng)
        t0 = time.perf_counter()
        svc.create_checkpoint(task.id)
        times.append(ms(t0))
    r["tb_10_bytes"] = du(store) - before
    r["tb_incr_median_ms"] = sorted(times)[len(times) // 2]
    r["tar_10_bytes"] = 10 * r["tar_bytes"]
    size0 = api.inspect_image(f"taskbox-bench:{task.id}-0")["Size"]
    size1 = api.inspect_image(f"taskbox-bench:{task.id}-1")["Size"]
    r["dc_layer_bytes"] = max(0, size1 - size0)
    for tag in (0, 1):
        api.remove_image(f"taskbox-bench:{task.id}-{tag}", force=True)
    r["store_ratio"] = r["tb_10_bytes"] / r["tar_bytes"]
    return r


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(results: list[dict[str, Any]]) -> str:
    rows = [("workspace", "measure", "taskbox", "tar.gz", "docker commit*")]
    for r in results:
        w = r["workspace"]
        rows += [
            (w, "first checkpoint", f"{r['tb_first_ms']:.0f} ms", f"{r['tar_first_ms']:.0f} ms", f"{r['dc_first_ms']:.0f} ms"),
            (w, "incremental (10 files changed)", f"{r['tb_incr_ms']:.0f} ms (median of 10: {r['tb_incr_median_ms']:.0f})",
             f"{r['tar_incr_ms']:.0f} ms", f"{r['dc_incr_ms']:.0f} ms"),
            (w, "restore 10 files back", f"{r['tb_restore_ms']:.0f} ms", f"{r['tar_restore_ms']:.0f} ms",
             f"{r['dc_restore_ms']:.0f} ms"),
            (w, "bytes: first snapshot", fmt_bytes(r["tb_first_bytes"]), fmt_bytes(r["tar_bytes"]), "-"),
            (w, "bytes: 10 incrementals", f"{fmt_bytes(r['tb_10_bytes'])} ({r['store_ratio']:.3f}x one tar.gz)",
             fmt_bytes(r["tar_10_bytes"]), fmt_bytes(r["dc_layer_bytes"])),
        ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("* docker commit does not capture the workspace (a bind mount): speed baseline only.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small workspaces only (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON too")
    args = ap.parse_args()
    sizes = [(200, 2 * 2**20), (1000, 10 * 2**20)] if args.quick else [(1000, 10 * 2**20), (20000, 200 * 2**20)]
    scratch = Path(tempfile.mkdtemp(prefix="taskbox-bench-"))
    svc = None
    try:
        home = scratch / "home"
        os.environ["TASKBOX_HOME"] = str(home)
        svc = TaskService(home)
        repo = scratch / "repo"
        repo.mkdir()
        env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
               "GIT_COMMITTER_EMAIL": "b@b"}
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
        (repo / "README.md").write_text("bench\n")
        subprocess.run(["git", "add", "."], cwd=repo, check=True)
        subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True, env=env)
        results = [bench_one(svc, repo, scratch, n, size) for n, size in sizes]
    finally:
        if svc is not None:
            for c in svc.sandbox.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
                svc.sandbox.api.remove_container(c["Id"], force=True)
            quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # before rmtree walks into them
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))
    big = results[-1]
    missed = []
    if big["tb_incr_ms"] >= TARGET_INCREMENTAL_MS:
        missed.append(f"incremental checkpoint {big['tb_incr_ms']:.0f} ms >= {TARGET_INCREMENTAL_MS} ms")
    if big["tb_restore_ms"] >= TARGET_RESTORE_MS:
        missed.append(f"restore {big['tb_restore_ms']:.0f} ms >= {TARGET_RESTORE_MS} ms")
    if big["store_ratio"] >= TARGET_STORE_RATIO:
        missed.append(f"10 incrementals store {big['store_ratio']:.2f}x one snapshot >= {TARGET_STORE_RATIO}x")
    print(f"\ntargets on {big['workspace']}: incremental < {TARGET_INCREMENTAL_MS} ms, restore < "
          f"{TARGET_RESTORE_MS} ms, 10 incrementals < {TARGET_STORE_RATIO}x one snapshot: "
          + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
