"""The one git helper: every git command taskbox runs on the host goes through :func:`run`.

It runs only on repositories the host trusts: the user's own and taskbox's private stores.
A task's workspace repository is written by the agent (its config, attributes, hooks,
``commondir``, gitfiles and alternates may all be traps), so git runs there only inside a
sandbox (:mod:`taskbox.workspace`), never through this helper.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, BinaryIO

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
IDENTITY_NAME = "taskbox"  # author and committer of taskbox's own commits
IDENTITY_EMAIL = "taskbox@localhost"
_IDENTITY = {
    "GIT_AUTHOR_NAME": IDENTITY_NAME,
    "GIT_AUTHOR_EMAIL": IDENTITY_EMAIL,
    "GIT_COMMITTER_NAME": IDENTITY_NAME,
    "GIT_COMMITTER_EMAIL": IDENTITY_EMAIL,
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


def _command(args: Sequence[str], harden: bool, env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    full_env = _env(env)
    cmd = ["git"]
    if harden:
        full_env["GIT_CONFIG_GLOBAL"] = "/dev/null"
        full_env["GIT_ATTR_NOSYSTEM"] = "1"
        for key, value in _SAFE_CONFIG.items():
            cmd += ["-c", f"{key}={value}"]
    else:
        cmd += ["-c", "safe.directory=*"]
    return cmd + list(args), full_env


def run(
    args: Sequence[str],
    cwd: Path,
    *,
    harden: bool = False,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    stdin: BinaryIO | None = None,
    timeout: float = 300,
    user: int | None = None,
    group: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``cwd``; raise :class:`GitError` with code and stderr on failure.

    Never point it at an agent-written repository (workspace git runs in the sandbox, see
    :mod:`taskbox.workspace`). ``harden=True`` is for taskbox's private stores: fixed
    overrides for every program-running config key, and no global config (a host-wide
    ``filter.lfs`` must not run on content that came from a workspace). ``user``/``group``
    run git as that uid/gid.
    """
    cmd, full_env = _command(args, harden, env)
    log.debug("git %s (cwd=%s)", " ".join(args), cwd)
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=full_env,
            input=input.decode(errors="surrogateescape") if input is not None else None,
            stdin=stdin,
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
        detail = " | ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())  # one line
        raise GitError(
            f"git {' '.join(args)} failed (exit {proc.returncode}): {detail}",
            command=["git", *args],
            returncode=proc.returncode,
            stderr=proc.stderr,
        )
    return proc


def popen(args: Sequence[str], cwd: Path, *, harden: bool = False, env: dict[str, str] | None = None,
          stderr: IO[bytes] | int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """Start ``git ARGS`` with binary pipes on stdin, stdout and stderr, for streaming.

    The same configuration and environment as :func:`run` (``harden=True`` for taskbox's
    private stores); for commands fed or read in chunks (``fast-import``, ``cat-file
    --batch``) so no content is ever held whole in memory. The caller waits for it; a
    ``stderr`` file keeps a chatty command from blocking on a pipe nobody reads yet.
    """
    cmd, full_env = _command(args, harden, env)
    log.debug("git %s (cwd=%s, streaming)", " ".join(args), cwd)
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)
    except FileNotFoundError as exc:
        raise GitError("git is not installed (install it with your package manager)") from exc


def repo_root(path: Path) -> Path:
    """The top of the git repository containing ``path``, or :class:`InvalidInput`."""
    if not path.exists():
        raise InvalidInput(f"{path} does not exist")
    proc = run(["rev-parse", "--show-toplevel"], cwd=path, check=False)
    if proc.returncode != 0:
        raise InvalidInput(f"{path} is not a git repository (run `git init` there first)")
    return Path(proc.stdout.strip()).resolve()


def ref_exists(repo: Path, ref: str) -> bool:
    proc = run(["rev-parse", "--verify", "--quiet", ref], cwd=repo, check=False)
    return proc.returncode == 0


# Names that are valid branch names by every rule of git-check-ref-format(1): letters,
# digits, "_", "-", "." and "/" in components that start with neither "." nor "-" (nor
# end in ".lock" or "."), no "..", no "//". Only a name outside it costs a git process.
_PLAIN_BRANCH = re.compile(r"^(?!.*\.\.)(?!.*\.lock(/|$))(?!.*\.(/|$))[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def check_ref_format(branch: str) -> bool:
    """Whether ``branch`` is a valid branch name (``git check-ref-format --branch``)."""
    if _PLAIN_BRANCH.match(branch) and branch != "HEAD":
        return True
    proc = subprocess.run(
        ["git", "check-ref-format", "--branch", branch], capture_output=True, text=True
    )
    return proc.returncode == 0
