"""Helpers the bench scripts share (a script run as ``python bench/X.py`` finds this module)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class BenchError(Exception):
    """The benchmark could not run."""


def make_repo(root: Path) -> Path:
    """A one-commit git repository at ``root/repo``."""
    repo = root / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    (repo / "README.md").write_text("bench\n")
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env=env, capture_output=True)
    return repo


def pct(samples: list[float], q: float) -> float:
    """The ``q`` quantile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
