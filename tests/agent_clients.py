"""The real OpenCode, Claude Code and Codex CLIs, pinned, installed from npm into ``.cache/agents``.

``scripts/setup`` installs them (CI runs it); :func:`installed` installs them too when a
test session starts without them, so a developer's plain ``pytest`` works. Missing Node.js
or npm is an error, never a skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from taskbox.agents import PRESETS

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TASKBOX_AGENTS_DIR") or ROOT / ".cache" / "agents")
# Pinned in taskbox/agents.py, the versions `taskbox image build --agents` puts in the sandbox
# too, and these tests were written against (bump deliberately, and re-run them). By binary name.
PACKAGES = {p.binary: (p.package.rpartition("@")[0], p.package.rpartition("@")[2])
            for p in PRESETS.values() if p.package}


def binary(name: str) -> Path:
    return CACHE / "node_modules" / ".bin" / name


def _version_ok(name: str) -> bool:
    exe = binary(name)
    if not exe.exists():
        return False
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return PACKAGES[name][1] in out


def installed() -> dict[str, Path]:
    """Install the pinned CLIs if they are missing (one installer at a time); their paths."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(_version_ok(n) for n in PACKAGES):
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("npm is not installed; run scripts/setup (it installs Node.js and the agent CLIs)")
            specs = [f"{pkg}@{version}" for pkg, version in PACKAGES.values()]
            proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(CACHE),
                                   *specs], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"npm install {' '.join(specs)} failed: {proc.stderr[-2000:]}")
            for name in PACKAGES:
                if not _version_ok(name):
                    raise RuntimeError(f"{binary(name)} is not version {PACKAGES[name][1]} after npm install")
    return {name: binary(name) for name in PACKAGES}
