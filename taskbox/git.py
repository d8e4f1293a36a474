"""The one git helper: every git command taskbox runs goes through :func:`run`.

A task's workspace is written by an agent inside a container, so its ``.git`` may hold
hostile configuration: hooks, an fsmonitor program, filter/diff/merge drivers, a pager or
editor. Git runs those on the host. For such *untrusted* repositories :func:`run` neutralises
every repository-config code path that executes a program, and refuses a ``.git`` that is
a link or a gitfile (which could point anywhere on the host).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import GitError, InvalidInput

log = logging.getLogger("taskbox.git")

# Overrides applied to every command on an untrusted repository. Command-line config wins
# over repository config, and git passes it on to child git processes (e.g. upload-pack).
_SAFE_CONFIG = {
    "core.hooksPath": "/dev/null",
    "core.fsmonitor": "false",
    "core.pager": "cat",
    "core.editor": "true",
    "sequence.editor": "true",
    "core.sshCommand": "false",
    "core.askPass": "",
    "core.alternateRefsCommand": "",
    "credential.helper": "",
    "diff.external": "",
    "gpg.program": "false",
    "commit.gpgSign": "false",
    "tag.gpgSign": "false",
    "protocol.ext.allow": "never",
    "safe.directory": "*",
}
# Per-driver keys that name a program to run; their driver names are found by scanning.
_DRIVER_KEY = re.compile(
    r"^(filter\.(?P<f>.+)\.(clean|smudge|process)|diff\.(?P<d>.+)\.(textconv|command)"
    r"|merge\.(?P<m>.+)\.driver|gpg\.(?P<g>.+)\.program)$",
    re.IGNORECASE,
)

_IDENTITY = {
    "GIT_AUTHOR_NAME": "taskbox",
    "GIT_AUTHOR_EMAIL": "taskbox@localhost",
    "GIT_COMMITTER_NAME": "taskbox",
    "GIT_COMMITTER_EMAIL": "taskbox@localhost",
}


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_NOSYSTEM="1",
        LC_ALL="C",
    )
    for key, value in _IDENTITY.items():
        env.setdefault(key, value)
    if extra:
        env.update(extra)
    return env


def upload_pack_command() -> str:
    """An ``--upload-pack`` program for fetching from an untrusted local repository.

    Local fetches spawn upload-pack inside the other repository without our ``-c`` config,
    so the overrides (and the ownership exception for the sandbox user's files) are given
    to it explicitly.
    """
    opts = " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in _SAFE_CONFIG.items())
    return f"git {opts} upload-pack"


def check_untrusted(repo: Path) -> None:
    """Refuse a workspace whose ``.git`` is not a plain directory inside it."""
    dotgit = repo / ".git"
    if dotgit.is_symlink() or not dotgit.is_dir():
        raise GitError(
            f"{dotgit} is not a plain directory (replaced by a link or gitfile?); "
            "refusing to run git on it"
        )


def _driver_overrides(repo: Path, env: dict[str, str]) -> list[str]:
    """Find program-running driver keys in an untrusted repo's config and blank them."""
    # Reading config never executes anything; --includes follows include/includeIf as git would.
    proc = subprocess.run(
        ["git", "-c", "safe.directory=*", "config", "--list", "--includes", "-z"],
        cwd=repo,
        env=env,
        capture_output=True,
        timeout=30,
    )
    args: list[str] = []
    for entry in proc.stdout.split(b"\0"):
        key = entry.split(b"\n", 1)[0].decode(errors="replace")
        m = _DRIVER_KEY.match(key)
        if m:
            args += ["-c", f"{key}="]
            if m.group("f"):
                args += ["-c", f"filter.{m.group('f')}.required=false"]
    return args


def run(
    args: Sequence[str],
    cwd: Path,
    *,
    untrusted: bool = False,
    harden: bool = False,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 300,
    user: int | None = None,
    group: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``cwd``; raise :class:`GitError` with code and stderr on failure.

    ``untrusted=True`` marks ``cwd`` as an agent-written repository: hooks and every
    config-driven program are disabled. ``harden=True`` applies the same fixed overrides
    without inspecting ``cwd`` (for commands that read *another*, untrusted repository). ``user``/``group`` run git as that uid/gid (used when
    taskbox runs as root, so files it writes in a workspace stay the sandbox user's).
    """
    full_env = _env(env)
    cmd = ["git"]
    if untrusted or harden:
        for key, value in _SAFE_CONFIG.items():
            cmd += ["-c", f"{key}={value}"]
    if untrusted:
        check_untrusted(cwd)
        cmd += _driver_overrides(cwd, full_env)
    else:
        cmd += ["-c", "safe.directory=*"]
    cmd += list(args)
    log.debug("git %s (cwd=%s)", " ".join(args), cwd)
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=full_env,
            input=input.decode(errors="surrogateescape") if input is not None else None,
            capture_output=True,
            text=True,
            errors="surrogateescape",  # file names need not be UTF-8; they round-trip via os.fsencode
            timeout=timeout,
            user=user,
            group=group,
        )
    except FileNotFoundError as exc:
        if not Path(cwd).exists():
            raise InvalidInput(f"directory {cwd} does not exist") from exc
        raise GitError("git is not installed (install it with your package manager)") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"git {' '.join(args)} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise GitError(
            f"git {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}",
            command=["git", *args],
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return proc


def repo_root(path: Path) -> Path:
    """The top of the git repository containing ``path``, or :class:`InvalidInput`."""
    if not path.exists():
        raise InvalidInput(f"{path} does not exist")
    proc = run(["rev-parse", "--show-toplevel"], cwd=path, check=False)
    if proc.returncode != 0:
        raise InvalidInput(f"{path} is not a git repository (run `git init` there first)")
    return Path(proc.stdout.strip()).resolve()


def ref_exists(repo: Path, ref: str, *, untrusted: bool = False) -> bool:
    proc = run(["rev-parse", "--verify", "--quiet", ref], cwd=repo, check=False, untrusted=untrusted)
    return proc.returncode == 0


def check_ref_format(branch: str) -> bool:
    proc = subprocess.run(
        ["git", "check-ref-format", "--branch", branch], capture_output=True, text=True
    )
    return proc.returncode == 0
