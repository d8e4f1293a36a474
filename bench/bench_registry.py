#!/usr/bin/env python3
"""Registry benchmark: `doctor` on 500 tasks, and an online backup of 500 tasks + 50,000 events.

Compares, on this machine and in this run:
  * `taskbox doctor` (integrity check, tombstones, per-task workspace and memory checks,
    Docker listing) vs a bare `taskbox list-tasks` on the same home — both as command lines;
  * in-process: ``TaskService.doctor()`` vs ``TaskService.list_tasks()``;
  * ``Registry.backup()`` (SQLite's online backup API, fsync, rename, rotation) vs a plain
    ``shutil.copyfile`` of the same database file (which would not be safe while it is written).

The tasks are registry rows with real workspaces holding valid memory (no containers: the
registry and the disk are what is measured). Needs Docker running (doctor lists containers).

    python bench/bench_registry.py [--tasks 500] [--events 50000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import Status, Task, TaskService  # noqa: E402


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds (one warm-up run not counted)."""
    samples = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        fn()
        if i:
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def populate(svc: TaskService, tasks: int, events: int) -> None:
    now = time.time()
    for i in range(tasks):
        tid = f"bench-task-{i:04d}"
        ws = svc.paths.workspace(tid)
        ws.mkdir(parents=True)
        task = Task(id=tid, title=f"bench task {i}", description="bench", status=Status.PAUSED, repo_path="/bench",
                    branch=f"bench/task-{i}", base_ref="main", workspace_path=str(ws), image="img", agent="bench",
                    model="m", created_at=now, last_active=now)
        svc.registry.insert_task(task)
        svc.memory(task).init(tid, "paused", task.branch, "exclusive")
    per = max(events // max(tasks, 1), 1)
    with svc.registry.tx() as conn:
        conn.executemany("INSERT INTO events (type, task_id, ts, payload) VALUES (?, ?, ?, ?)",
                         [("bench.event", f"bench-task-{i % tasks:04d}", now, json.dumps({"n": i, "pad": "x" * 80}))
                          for i in range(per * tasks)])


def cli(home: Path, *args: str) -> Callable[[], object]:
    env = {**os.environ, "TASKBOX_HOME": str(home)}

    def run() -> object:
        subprocess.run([sys.executable, "-m", "taskbox", *args], env=env, check=True, capture_output=True)
        return None

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        home = Path(tmp) / "home"
        os.environ["TASKBOX_WORKSPACE_QUOTA"] = "0"
        os.environ["TASKBOX_BACKUP_INTERVAL_MINUTES"] = "0"  # only the backups measured here
        svc = TaskService(home)
        populate(svc, args.tasks, args.events)
        db_bytes = svc.paths.db.stat().st_size + (svc.paths.db.with_name("registry.db-wal").stat().st_size
                                                  if svc.paths.db.with_name("registry.db-wal").exists() else 0)
        rows = []
        base = timed(lambda: svc.list_tasks(), args.runs)
        doc = timed(lambda: svc.doctor(), args.runs)
        rows.append(("doctor, in-process", doc, "list_tasks()", base))
        base = timed(cli(home, "list-tasks"), args.runs)
        doc = timed(cli(home, "doctor"), args.runs)
        rows.append(("`taskbox doctor`", doc, "`taskbox list-tasks`", base))
        svc.registry.backup_keep = args.runs + 2
        copy_to = Path(tmp) / "copy.db"
        backup = timed(lambda: svc.registry.backup(), args.runs)
        base = timed(lambda: shutil.copyfile(svc.paths.db, copy_to), args.runs)
        rows.append((f"backup ({args.tasks} tasks, {args.events:,} events)", backup, "plain file copy", base))
        result = {"tasks": args.tasks, "events": args.events, "db_bytes": db_bytes,
                  "rows": [{"what": w, "ms": round(ms, 1), "baseline": b, "baseline_ms": round(bms, 1),
                            "ratio": round(ms / bms, 2) if bms else None} for w, ms, b, bms in rows]}
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"registry: {args.tasks} tasks, {args.events:,} events, {db_bytes / 1e6:.1f} MB; median of {args.runs}")
        print(f"{'measured':<44} {'ms':>9}   {'baseline':<24} {'ms':>9} {'ratio':>7}")
        for w, ms, b, bms in rows:
            print(f"{w:<44} {ms:>9.1f}   {b:<24} {bms:>9.1f} {ms / bms:>6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
