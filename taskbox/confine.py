"""Path confinement: every path an agent gives must stay inside the task's workspace.

Workspaces are written by agents, so any component may be a symlink pointing out of the
workspace. Host-side reads and writes resolve the path fully and refuse anything whose real
location is outside, and open the final component without following links.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from .errors import PathOutsideWorkspace

CONTAINER_ROOT = "/workspace"


def host_path(root: Path, path: str | os.PathLike[str], *, allow_root: bool = True) -> Path:
    """Resolve ``path`` (relative to ``root``, or absolute under ``root`` or ``/workspace``).

    Raises :class:`PathOutsideWorkspace` for ``..`` escapes, absolute paths elsewhere and
    links whose target leaves the workspace.
    """
    root = root.resolve()
    raw = os.fspath(path)
    if "\0" in raw:
        raise PathOutsideWorkspace(f"path {raw!r} contains a NUL byte")
    if raw.startswith(CONTAINER_ROOT + "/") or raw == CONTAINER_ROOT:
        raw = raw[len(CONTAINER_ROOT) :].lstrip("/") or "."
    candidate = Path(raw)
    if candidate.is_absolute():
        try:
            candidate = candidate.relative_to(root)
        except ValueError:
            raise PathOutsideWorkspace(
                f"path {raw!r} is outside the task workspace", path=raw
            ) from None
    lexical = posixpath.normpath(candidate.as_posix())
    if lexical == ".." or lexical.startswith("../"):
        raise PathOutsideWorkspace(f"path {raw!r} escapes the task workspace", path=raw)
    full = root / lexical
    # strict=False: the final parts may not exist yet (a file about to be written).
    real = full.resolve(strict=False)
    if real != root and root not in real.parents:
        raise PathOutsideWorkspace(
            f"path {raw!r} leads outside the task workspace (through a link)", path=raw
        )
    if not allow_root and real == root:
        raise PathOutsideWorkspace(f"path {raw!r} is the workspace root itself", path=raw)
    return full


def container_workdir(root: Path, workdir: str | None) -> str:
    """Map a workdir given by an agent to a path inside the container, confined to /workspace."""
    if not workdir:
        return CONTAINER_ROOT
    full = host_path(root, workdir)
    rel = full.relative_to(root.resolve()).as_posix()
    return CONTAINER_ROOT if rel == "." else f"{CONTAINER_ROOT}/{rel}"


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink as the final component."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
