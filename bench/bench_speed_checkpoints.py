"""Checkpoints in proportion to what changed (issue 16): a workspace of 10,000 small files and
one 50 MB incompressible binary.

Run: ``python bench/bench_speed_checkpoints.py`` (``--json`` for the raw numbers too).

Needs Docker and the sandbox image. Measures, in one run, through the service API with the
task's container running (so every checkpoint freezes and thaws it, as in use):

- the first checkpoint, against a ``tar czf`` of the same workspace timed in the same run
  (target: at most 0.5x the tar);
- a checkpoint after appending 4 bytes to the 50 MB file: the bytes the store grew by
  (target < 1 MB) and its time (target < 150 ms);
- 13 more changes (4 bytes appended to the binary and one small file edited, each
  checkpointed), one more left uncheckpointed, then a restore of the checkpoint 13 changes
  back (target < 0.3 s), checked byte for byte.

Each figure is the median of ``--repeat`` runs (3 by default) of the same steps on fresh
tasks; the first-checkpoint ratio is taken within each run, then the median. Exit status 1
if a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
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

TARGET_FIRST_RATIO = 0.5
TARGET_APPEND_BYTES = 1 << 20
TARGET_APPEND_MS = 150
TARGET_RESTORE_MS = 300
SMALL_FILES = 10_000
BIG_BYTES = 50 * 2**20
CHANGES = 13


def generate(ws: Path, seed: int) -> None:
    rng = __import__("random").Random(seed)
    for i in range(SMALL_FILES):
        d = ws / "src" / f"pkg{i % 97:02d}" / f"mod{i % 13}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.txt").write_bytes(" ".join(f"tok{rng.randrange(5000)}" for _ in range(30)).encode())
    (ws / "assets").mkdir(exist_ok=True)
    (ws / "assets" / "model.bin").write_bytes(os.urandom(BIG_BYTES))


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def digest(ws: Path) -> dict[str, str]:
    """Content of every file except the task's own append-only history."""
    out = {}
    for dirpath, _dirs, names in os.walk(ws):
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(ws))
            if rel.startswith(".task-memory/") or rel == "Plan.md" or p.is_symlink():
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def one_run(svc: TaskService, repo: Path, scratch: Path, n: int) -> dict[str, Any]:
    task = svc.create_task(repo, f"speed {n}")
    ws = Path(task.workspace_path)
    generate(ws, n)
    hand_over(ws)
    digest(ws)  # every file read once: the page cache is as warm for taskbox as for tar
    r: dict[str, Any] = {}
    t0 = time.perf_counter()
    subprocess.run(["tar", "czf", str(scratch / f"ws{n}.tar.gz"), "-C", str(ws), "."], check=True)
    r["tar_ms"] = ms(t0)
    r["tar_bytes"] = (scratch / f"ws{n}.tar.gz").stat().st_size
    store = svc.checkpoints.store(task.id)

    t0 = time.perf_counter()
    svc.create_checkpoint(task.id, "first")
    r["first_ms"] = ms(t0)
    r["first_bytes"] = du(store.path)

    big = ws / "assets" / "model.bin"
    with open(big, "ab") as fh:
        fh.write(b"1234")
    before = du(store.path)
    t0 = time.perf_counter()
    svc.create_checkpoint(task.id)
    r["append_ms"] = ms(t0)
    r["append_bytes"] = du(store.path) - before

    cps, states = [], []
    for i in range(CHANGES):
        with open(big, "ab") as fh:
            fh.write(b"%04d" % i)
        (ws / "src" / "pkg00" / "mod0" / "file00000.txt").write_text(f"edit {i}\n")
        hand_over(ws)
        cps.append(svc.create_checkpoint(task.id)["checkpoint_id"])
        states.append(digest(ws))
    with open(big, "ab") as fh:  # one more change, not checkpointed: the restore captures it first
        fh.write(b"last")
    (ws / "src" / "pkg01" / "mod1" / "file00001.txt").write_text("not checkpointed\n")
    target = 0  # 13 changes back from the newest checkpoint ... and one more from the workspace
    t0 = time.perf_counter()
    svc.restore_checkpoint(task.id, cps[target])
    r["restore_ms"] = ms(t0)
    r["restore_exact"] = digest(ws) == states[target]
    return r


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON too")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="taskbox-speed-"))
    svc = None
    runs: list[dict[str, Any]] = []
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
        for n in range(max(1, args.repeat)):
            runs.append(one_run(svc, repo, scratch, n))
    finally:
        if svc is not None:
            for c in svc.sandbox.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
                svc.sandbox.api.remove_container(c["Id"], force=True)
            quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # before rmtree walks into them
        shutil.rmtree(scratch, ignore_errors=True)

    for r in runs:
        r["first_ratio"] = r["first_ms"] / r["tar_ms"]  # taskbox and tar side by side, in each run
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "restore_exact"}
    ratio = med["first_ratio"]
    exact = all(r["restore_exact"] for r in runs)
    rows = [
        ("measure", "taskbox", "baseline (same run)", "target", "met"),
        ("first checkpoint", f"{med['first_ms']:.0f} ms ({fmt_bytes(med['first_bytes'])})",
         f"tar czf {med['tar_ms']:.0f} ms ({fmt_bytes(med['tar_bytes'])})",
         f"<= {TARGET_FIRST_RATIO}x tar: {ratio:.2f}x", ratio <= TARGET_FIRST_RATIO),
        ("4-byte append: stored", fmt_bytes(med["append_bytes"]), "", f"< {fmt_bytes(TARGET_APPEND_BYTES)}",
         med["append_bytes"] < TARGET_APPEND_BYTES),
        ("4-byte append: time", f"{med['append_ms']:.0f} ms", "", f"< {TARGET_APPEND_MS} ms",
         med["append_ms"] < TARGET_APPEND_MS),
        (f"restore {CHANGES} changes back", f"{med['restore_ms']:.0f} ms ({'byte-exact' if exact else 'NOT EXACT'})",
         "", f"< {TARGET_RESTORE_MS} ms", med["restore_ms"] < TARGET_RESTORE_MS and exact),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c if not isinstance(c, bool) else ("yes" if c else "NO")).ljust(widths[i])
                       for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{SMALL_FILES} small files + one {BIG_BYTES >> 20} MB incompressible file; median of {len(runs)} runs "
          f"on {os.cpu_count()} CPUs (load average at the end: {load})")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(runs, indent=2))
    missed = [row[0] for row in rows[1:] if not row[4]]
    print("\ntargets: " + ("all met" if not missed else "MISSED: " + ", ".join(str(m) for m in missed)))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
