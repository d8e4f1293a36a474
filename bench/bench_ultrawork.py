#!/usr/bin/env python3
"""Benchmark: ultrawork's parallel sub-tasks against the ideal, and its per-sub-task overhead.

In one run, on the real Docker engine and git, it measures

- **parallel wall time**: 8 independent sub-tasks, each ``sleep 5``, with ``--parallel 4``,
  from the start of the run to its end (every sub-task merged), against the ideal 10 s (two
  waves of 5 s with no overhead at all). Target (issue 14): at most 1.3 × the ideal;
- **per-sub-task overhead** (create + finish + merge) against a **plain create** of a task
  measured in the same run (the baseline): for each sub-task, its time from start to the
  end of its run less the 5 s of its command, plus the time its merge took;
- **merging 8 branches**: 8 sub-tasks run with ``--no-merge``, then one resumed run that only
  merges them (each a --no-ff commit in the parent's sandbox), total and per branch.

Prints a table; exits 1 if the wall-time target is missed. ``--phases`` adds a breakdown of
where the time went in the parallel run (calls and seconds per phase, summed over threads,
with the orchestrator's own share: the critical path between the waves).

    python bench/bench_ultrawork.py [--json] [--phases]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import TaskService, quota, workspace  # noqa: E402
from taskbox import merge as merge_engine  # noqa: E402
from taskbox import service as service_module  # noqa: E402
from taskbox.sandbox import LABEL_HOME, Sandbox  # noqa: E402

TARGET = 1.3
SLEEP = 5.0
COUNT = 8
PARALLEL = 4


class Phases:
    """Wall time per phase (a wrapped function), per thread, while ``on``."""

    # (owner, attribute, label): the steps of a sub-task's life and of the orchestrator's loop
    POINTS: list[tuple[object, str, str]] = [
        (TaskService, "_publish", "publish (commit + fetch)"),
        (TaskService, "_create_child", "create child"),
        (TaskService, "exec", "exec (command)"),
        (TaskService, "_end_child", "finish child"),
        (TaskService, "_merge_many_into_task", "merge into parent (one or more)"),
        (TaskService, "_subtasks_changed", "Plan.md table"),
        (TaskService, "complete", "complete child"),
        (TaskService, "ensure_running", "ensure running"),
        (TaskService, "recover_subtasks", "recover"),
        (TaskService, "_create_container", "  container create+start"),
        (TaskService, "create_checkpoint", "  checkpoint"),
        (workspace, "create", "  clone"),
        (workspace, "commit_fresh", "  first commit (host)"),
        (workspace, "publish", "  commit + fetch (sandbox + host)"),
        (merge_engine, "bundle_from", "  bundle for merge"),
        (merge_engine, "in_workspace_many", "  merge script (sandbox)"),
        (Sandbox, "capture", "    docker exec (capture)"),
        (Sandbox, "stop", "    docker stop"),
    ]

    def __init__(self) -> None:
        self.on = False
        self.records: list[tuple[str, str, float]] = []  # (label, thread, seconds)
        self.spans: list[tuple[str, str, float, float]] = []  # (label, thread, start, end)
        self._lock = threading.Lock()
        self._saved: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for owner, attr, label in self.POINTS:
            fn = getattr(owner, attr)
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(fn, label))
        # the service module holds its own references to the two engines' modules
        assert service_module.workspace is workspace and service_module.merge_engine is merge_engine

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)

    def _wrap(self, fn: Callable[..., object], label: str) -> Callable[..., object]:
        phases = self

        def timed(*args: object, **kwargs: object) -> object:
            if not phases.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                with phases._lock:
                    phases.records.append((label, threading.current_thread().name, t1 - t0))
                    phases.spans.append((label, threading.current_thread().name, t0, t1))
        return timed

    def table(self) -> list[tuple[str, int, float, float]]:
        """(label, calls, seconds summed over threads, seconds in the orchestrator's thread)."""
        out = []
        for _owner, _attr, label in self.POINTS:
            rows = [r for r in self.records if r[0] == label]
            if rows:
                out.append((label, len(rows), sum(r[2] for r in rows),
                            sum(r[2] for r in rows if r[1] == "MainThread")))
        return out


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "init"]):
        if args[0] == "add":
            (repo / "README.md").write_text("# bench\n")
        subprocess.run(["git", *args], cwd=repo, check=True, env=env)
    return repo


def plan(prefix: str, command: str) -> dict[str, object]:
    return {"parallel": PARALLEL, "subtask": [{"id": f"{prefix}{n}", "title": f"{prefix} {n}",
                                               "command": command.format(n=n)} for n in range(COUNT)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phases", action="store_true", help="also print where the parallel run's time went")
    ap.add_argument("--timeline", action="store_true", help="with --phases: every phase's start and end")
    opts = ap.parse_args()
    phases = Phases()
    if opts.phases:
        phases.install()
    root = Path(tempfile.mkdtemp(prefix="bench-ultrawork-"))
    svc = TaskService(root / "home")
    try:
        repo = make_repo(root)
        # the baseline: a plain create (container started), three times, median
        creates = []
        for n in range(3):
            t0 = time.perf_counter()
            svc.create_task(repo, f"baseline create {n}")
            creates.append(time.perf_counter() - t0)
        create_s = statistics.median(creates)

        parent = svc.create_task(repo, "bench parallel parent")
        svc.create_subtasks(parent.id, plan("s", f"sleep {SLEEP:g}; echo {{n}} > out{{n}}.txt"))
        run_t0 = time.perf_counter()
        phases.on = True
        res = svc.run_subtasks(parent.id, parallel=PARALLEL)
        phases.on = False
        wall = time.perf_counter() - run_t0
        bad = [s["id"] for s in res["subtasks"] if s["status"] != "merged"]
        if bad:
            raise SystemExit(f"sub-tasks not merged: {bad}")
        events = svc.registry.events(parent.id, limit=10_000)
        succeeded = {e["payload"]["subtask"]: e["ts"] for e in events if e["type"] == "subtask.succeeded"}
        merged = {e["payload"]["subtask"]: e["ts"] for e in events if e["type"] == "subtask.merged"}
        runs = [s["finished_at"] - s["started_at"] - SLEEP for s in res["subtasks"]]
        # a merge's own time: from when the orchestrator could start it (the later of the
        # sub-task's success and the previous merge) to its record
        order = sorted(merged, key=merged.get)  # type: ignore[arg-type]
        merges, previous = [], 0.0
        for sid in order:
            merges.append(merged[sid] - max(succeeded[sid], previous))
            previous = merged[sid]
        per_subtask = [r + m for r, m in zip(sorted(runs), sorted(merges), strict=True)]

        # merging 8 branches: run them without merging, then a run that only merges
        parent2 = svc.create_task(repo, "bench merge parent")
        svc.create_subtasks(parent2.id, plan("m", "echo {n} > m{n}.txt"))
        svc.run_subtasks(parent2.id, parallel=PARALLEL, merge=False)
        t0 = time.perf_counter()
        res2 = svc.run_subtasks(parent2.id, parallel=PARALLEL, merge=True, resume=True)
        merge_all = time.perf_counter() - t0
        if any(s["status"] != "merged" for s in res2["subtasks"]):
            raise SystemExit("the merge-only run did not merge every branch")
    finally:
        phases.uninstall()
        for c in svc.sandbox.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
            svc.sandbox.api.remove_container(c["Id"], force=True)
        quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # workspace volumes unmounted first
        subprocess.run(["rm", "-rf", str(root)], check=False)

    ideal = SLEEP * COUNT / PARALLEL
    rows = [
        (f"{COUNT} x sleep {SLEEP:g} s, --parallel {PARALLEL} (wall)", wall, ideal, wall / ideal),
        ("per sub-task overhead: create + finish + merge (median)", statistics.median(per_subtask), create_s,
         statistics.median(per_subtask) / create_s),
        ("  of which create + finish (median)", statistics.median(runs), create_s, statistics.median(runs) / create_s),
        ("  of which merge (median)", statistics.median(merges), create_s, statistics.median(merges) / create_s),
        (f"merging {COUNT} branches (total)", merge_all, create_s * COUNT, merge_all / (create_s * COUNT)),
        ("  per branch", merge_all / COUNT, create_s, merge_all / COUNT / create_s),
    ]
    ok = wall / ideal <= TARGET
    if opts.json:
        print(json.dumps({"wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal, "target": TARGET, "ok": ok,
                          "plain_create_s": create_s, "per_subtask_overhead_s": per_subtask,
                          "run_overhead_s": runs, "merge_s": merges, "merge_all_s": merge_all,
                          "phases": [{"phase": label.strip(), "calls": n, "seconds": total, "orchestrator_s": main}
                                     for label, n, total, main in phases.table()]}, indent=2))
    else:
        print(f"{'measure':58} {'seconds':>8} {'baseline':>9} {'ratio':>6}")
        for name, value, base, ratio in rows:
            print(f"{name:58} {value:8.2f} {base:9.2f} {ratio:6.2f}")
        print(f"\nbaselines: the ideal {ideal:g} s (no overhead) for the wall time; a plain create "
              f"({create_s:.2f} s, median of 3, same run) for the overheads")
        if opts.phases:
            print(f"\nthe parallel run by phase (wall time {wall:.2f} s; threads overlap)")
            print(f"{'phase':34} {'calls':>5} {'seconds':>8} {'per call':>8} {'orchestrator':>12}")
            for label, n, total, main in phases.table():
                print(f"{label:34} {n:5d} {total:8.2f} {total / n:8.3f} {main:12.2f}")
            print()
        if opts.phases and opts.timeline:
            for label, thread, a, b in sorted(phases.spans, key=lambda r: (r[1], r[2])):
                print(f"{thread:14} {a - run_t0:7.2f} {b - run_t0:7.2f} {label.strip()}")
            print()
        print(f"target: wall time <= {TARGET} x ideal: {'met' if ok else 'MISSED'} ({wall / ideal:.2f} x); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
