"""Host caches shared read-only with task sandboxes (``[sandbox] caches = ["pip", "npm", "uv"]``).

Each named cache is one directory on the host, ``TASKBOX_HOME/caches/NAME``, made by taskbox
when first needed (owned by the sandbox user), and bind-mounted **read-only** at
``/opt/taskbox/caches/NAME`` into every sandbox of a project that names it. Tasks share it and
none can write to it, so no task can poison what another installs.

The tools cannot use a read-only directory as their own cache (pip switches off a cache it
cannot write; uv and npm fail, npm because it rewrites its index on every lookup), so each
sandbox keeps its own writable cache and reads the shared one as a *source*:

======  ==================================  ==========================================================
cache   the shared directory holds          the sandbox gets
======  ==================================  ==========================================================
pip     wheels (a flat find-links folder)   ``PIP_FIND_LINKS``; ``PIP_NO_INDEX=1`` with network none
uv      wheels (a flat find-links folder)   ``UV_FIND_LINKS``; ``UV_OFFLINE=1`` with network none
npm     an npm cache (``_cacache``)         copied into the container's own ``~/.npm`` when the
                                            container is made; ``npm_config_prefer_offline``
                                            (``npm_config_offline`` with network none)
======  ==================================  ==========================================================

**Filling** (``taskbox cache warm NAME PACKAGE... [-r requirements.txt]``): the tool runs in a
throwaway hardened container of the sandbox image, with network, the host's CA bundle
(read-only) and the cache directory as its only writable mount; pip/uv build wheels of the
packages and their dependencies, npm installs them (``--ignore-scripts``) into a scratch
folder with the cache as its cache. What it writes is treated like a workspace: the host
never interprets it, it only sums sizes (``lstat``, never following a link, bounded).
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .confine import sandbox_owner
from .errors import InvalidInput

MOUNT_ROOT = "/opt/taskbox/caches"
REQUIREMENTS_MAX = 64 * 1024  # bytes of a requirements file passed to `cache warm`
_WALK_MAX = 200_000  # entries summed by usage(); a larger cache is reported as at least that


@dataclass(frozen=True)
class Cache:
    """One kind of shared cache: how a sandbox reads it and how `cache warm` fills it."""

    name: str
    env: dict[str, str]
    offline_env: dict[str, str] = field(default_factory=dict)  # added when the task has no network
    fills: str = "wheels"

    @property
    def target(self) -> str:
        return f"{MOUNT_ROOT}/{self.name}"


CACHES: dict[str, Cache] = {
    "pip": Cache("pip", {"PIP_FIND_LINKS": f"{MOUNT_ROOT}/pip"}, {"PIP_NO_INDEX": "1"}),
    "uv": Cache("uv", {"UV_FIND_LINKS": f"{MOUNT_ROOT}/uv"}, {"UV_OFFLINE": "1"}),
    "npm": Cache("npm", {"npm_config_prefer_offline": "true"}, {"npm_config_offline": "true"}, fills="npm"),
}

# Run in the sandbox user's fresh container: the shared npm cache becomes its own writable one.
NPM_SEED = f'mkdir -p "$HOME/.npm" && cp -a {MOUNT_ROOT}/npm/. "$HOME/.npm/"'


def get(name: str) -> Cache:
    try:
        return CACHES[name]
    except KeyError:
        raise InvalidInput(f"unknown cache {name!r}; known: {', '.join(sorted(CACHES))}") from None


def check_names(names: list[str], where: str) -> list[str]:
    """The cache names of a project file, each known, without repeats."""
    bad = [n for n in names if n not in CACHES]
    if bad:
        raise InvalidInput(f"{where}: unknown cache {bad[0]!r} in sandbox.caches; known: {', '.join(sorted(CACHES))}")
    return list(dict.fromkeys(names))


def host_dir(home: Path, name: str, *, create: bool = True) -> Path:
    """The cache's directory on the host, made (owned by the sandbox user) if missing."""
    get(name)
    path = home / "caches" / name
    if create and not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)
        if os.geteuid() == 0:  # the warm container runs as the sandbox user, never root
            os.chown(path, *sandbox_owner())
    return path


def sandbox_env(names: list[str], network: str) -> dict[str, str]:
    """The environment a task's container gets for its caches."""
    env: dict[str, str] = {}
    for name in names:
        cache = get(name)
        env.update(cache.env)
        if network == "none":
            env.update(cache.offline_env)
    return env


def warm_command(name: str, packages: list[str], requirements: bool) -> list[str]:
    """The argv that fills cache ``name`` (mounted at ``/workspace``) in a throwaway container.

    A requirements file's text, when given, is in ``$TASKBOX_REQUIREMENTS`` (never a file the
    host writes into the cache).
    """
    cache = get(name)
    for p in packages:
        if not p.strip() or p.startswith("-") or "\n" in p or "\0" in p:
            raise InvalidInput(f"cache warm: {p!r} is not a package name")
    if not packages and not requirements:
        raise InvalidInput("cache warm: name packages (or a requirements file) to put in the cache")
    pkgs = " ".join(shlex.quote(p) for p in packages)
    if cache.fills == "npm":
        if requirements:
            raise InvalidInput("cache warm npm: a requirements file is for pip and uv; name the npm packages")
        script = ("mkdir -p /tmp/taskbox-warm && cd /tmp/taskbox-warm && "
                  f"npm install --no-save --ignore-scripts --no-audit --no-fund --cache /workspace {pkgs}")
    else:
        req = ' && printf "%s" "$TASKBOX_REQUIREMENTS" > /tmp/taskbox-req.txt' if requirements else ""
        script = (f"python3 -m venv /tmp/taskbox-warm{req} && /tmp/taskbox-warm/bin/pip wheel --no-cache-dir "
                  f"--wheel-dir /workspace {'-r /tmp/taskbox-req.txt ' if requirements else ''}{pkgs}")
    return ["sh", "-c", script]


def warm_env(ca_file: str | None) -> dict[str, str]:
    """The throwaway container's environment: the host's CA bundle (mounted at ``ca_file``)
    and index/registry settings, never the host's credentials or local file indexes."""
    env = {"HOME": "/tmp/taskbox-warm-home", "npm_config_logs_dir": "/tmp/taskbox-warm-logs",
           "npm_config_update_notifier": "false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if ca_file:
        env.update(PIP_CERT=ca_file, npm_config_cafile=ca_file, SSL_CERT_FILE=ca_file)
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "npm_config_registry"):
        value = os.environ.get(key, "")
        if value.startswith(("http://", "https://")) and "@" not in value:  # no embedded credentials
            env[key] = value
    return env


def host_ca_file() -> Path | None:
    """The host's CA bundle (for a TLS-intercepting proxy), as pip, npm and OpenSSL are told of it."""
    for key in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "npm_config_cafile"):
        value = os.environ.get(key)
        if value and Path(value).is_file():
            return Path(value)
    return None


def usage(home: Path) -> list[dict[str, Any]]:
    """Each known cache: its host directory, whether it exists, its files and bytes.

    The directory was written by a throwaway container: walked without following links,
    sizes from ``lstat``, at most ``_WALK_MAX`` entries.
    """
    rows = []
    for name in sorted(CACHES):
        path = host_dir(home, name, create=False)
        files = size = seen = 0
        if path.is_dir() and not path.is_symlink():
            for top, dirs, names in os.walk(path, followlinks=False):
                for n in names:
                    try:
                        st = os.lstat(os.path.join(top, n))
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        files += 1
                        size += st.st_size
                seen += len(dirs) + len(names)
                if seen > _WALK_MAX:
                    break
        rows.append({"name": name, "path": str(path), "exists": path.is_dir(), "files": files, "bytes": size,
                     "mount": CACHES[name].target, "env": CACHES[name].env})
    return rows
