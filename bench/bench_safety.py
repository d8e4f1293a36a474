#!/usr/bin/env python3
"""The price of the host boundary: safe operations against the unsafe host-side way, one run.

Each row times taskbox's operation (through the core API, on a real task) and, as the
baseline, what it replaced — the same work done the unsafe way, directly on the host, in
this run on the same workspace:

  * read_task_file of a small file: the confined primitive (openat2 beneath the root, fstat,
    bounded read) vs a plain ``open().read()`` after a ``Path.resolve()`` check;
  * task_diff: git run inside the task's sandbox vs host-side ``git diff`` in the workspace;
  * sync (commit + fetch into the user's repository, as detach does): commit in the sandbox,
    a bounded bundle streamed to the host and fetched vs host-side ``git commit`` plus
    ``git fetch`` from the workspace;
  * a checkpoint of a 1k-file workspace after one change (the engine as it is) vs the
    old way, host git adding the workspace as a work tree into a private index.

Target (host-boundary issue): read_task_file of a small file stays under 10 ms.
Exits 1 if it is missed.

    python bench/bench_safety.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from taskbox import TaskService, quota  # noqa: E402
from taskbox.sandbox import LABEL_HOME  # noqa: E402

ENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@b"}


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds (one warm-up run not counted)."""
    samples = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        fn()
        if i:
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=ENV, check=True,
                          capture_output=True, text=True).stdout


def make_repo(root: Path, files: int) -> Path:
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    for i in range(files):
        (repo / "src" / f"f{i}.py").write_text(f"value = {i}\n" * 10)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    return repo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["TASKBOX_HOME"] = str(root / "home")
        svc = TaskService(root / "home")
        try:
            repo = make_repo(root, 1000)
            task = svc.create_task(repo, "price of safety")
            ws = Path(task.workspace_path)
            svc.exec(task.id, "printf 'hello\\n' > small.txt")

            def unsafe_read() -> bytes:
                p = (ws / "small.txt").resolve()
                assert ws.resolve() in p.parents
                return p.read_bytes()

            rows.append({"operation": "read_task_file (small file)",
                         "taskbox_ms": timed(lambda: svc.read_text(task.id, "small.txt"), opts.runs * 20),
                         "baseline_ms": timed(unsafe_read, opts.runs * 20),
                         "baseline": "host open() after resolve()"})

            svc.exec(task.id, "echo change >> src/f1.py")
            rows.append({"operation": "task_diff",
                         "taskbox_ms": timed(lambda: svc.diff(task.id), opts.runs),
                         "baseline_ms": timed(lambda: git(ws, "diff", "--no-ext-diff", "--no-textconv"),
                                              opts.runs),
                         "baseline": "host git diff in the workspace"})

            counter = iter(range(10**6))

            def safe_sync() -> None:
                svc.exec(task.id, f"echo {next(counter)} >> src/f2.py")
                svc.sync(task.id)

            # The baseline works on a copy of the workspace fetched into a second repository.
            copy = root / "copy"
            subprocess.run(["cp", "-a", str(ws), str(copy)], check=True)
            user2 = root / "user2"
            subprocess.run(["git", "clone", "-q", str(repo), str(user2)], check=True)

            def unsafe_sync() -> None:
                with open(copy / "src/f2.py", "a") as fh:
                    fh.write(f"{next(counter)}\n")
                git(copy, "add", "--all")
                git(copy, "commit", "-qm", "sync")
                git(user2, "fetch", "-q", "--upload-pack=git -c safe.directory=* upload-pack", str(copy / ".git"), f"+refs/heads/{task.branch}:refs/heads/{task.branch}")

            rows.append({"operation": "sync / detach (commit + fetch)",
                         "taskbox_ms": timed(safe_sync, opts.runs) - timed(
                             lambda: svc.exec(task.id, "echo x >> src/f3.py"), opts.runs),
                         "baseline_ms": timed(unsafe_sync, opts.runs),
                         "baseline": "host git commit + fetch from the workspace"})

            store = root / "old-store"
            subprocess.run(["git", "init", "-q", "--bare", str(store)], check=True)
            index = root / "old-index"

            def old_checkpoint() -> None:
                env = {**ENV, "GIT_DIR": str(store), "GIT_WORK_TREE": str(copy), "GIT_INDEX_FILE": str(index)}
                with open(copy / "src/f4.py", "a") as fh:
                    fh.write("x\n")
                subprocess.run(["git", "add", "--all", "--force"], env=env, check=True, cwd=copy)
                subprocess.run(["git", "write-tree"], env=env, check=True, cwd=copy, capture_output=True)

            n = iter(range(10**6))

            def new_checkpoint() -> None:
                svc.exec(task.id, "echo x >> src/f4.py")
                svc.create_checkpoint(task.id, f"b{next(n)}")

            rows.append({"operation": "checkpoint, 1k files, one changed",
                         "taskbox_ms": timed(new_checkpoint, opts.runs) - timed(
                             lambda: svc.exec(task.id, "echo x >> src/f5.py"), opts.runs),
                         "baseline_ms": timed(old_checkpoint, opts.runs),
                         "baseline": "host git add --work-tree=workspace + write-tree"})
        finally:
            for c in svc.sandbox.api.containers(all=True, filters={"label": f"{LABEL_HOME}={svc.home_label}"}):
                svc.sandbox.api.remove_container(c["Id"], force=True)
            quota.release_all(svc.paths.volumes, svc.paths.workspaces)  # unmount the workspace volumes
    for r in rows:
        r["ratio"] = round(float(r["taskbox_ms"]) / max(float(r["baseline_ms"]), 1e-6), 2)  # type: ignore[arg-type]
        r["taskbox_ms"] = round(float(r["taskbox_ms"]), 2)  # type: ignore[arg-type]
        r["baseline_ms"] = round(float(r["baseline_ms"]), 2)  # type: ignore[arg-type]
    read_ms = float(rows[0]["taskbox_ms"])  # type: ignore[arg-type]
    ok = read_ms < 10
    if opts.json:
        print(json.dumps({"rows": rows, "read_target_met": ok}, indent=2))
    else:
        print(f"{'operation':36} {'taskbox ms':>11} {'baseline ms':>12} {'ratio':>6}  baseline")
        print("-" * 110)
        for r in rows:
            print(f"{r['operation']:36} {r['taskbox_ms']:>11} {r['baseline_ms']:>12} {r['ratio']:>6}  {r['baseline']}")
        print(f"\nread_task_file of a small file < 10 ms: {'met' if ok else 'NOT MET'} ({read_ms} ms)")
        print("sync/checkpoint rows subtract the exec that makes the change in the sandbox.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
