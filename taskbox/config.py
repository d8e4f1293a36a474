"""Where taskbox keeps its state, and the settings that tune it.

All state lives under one directory, ``TASKBOX_HOME`` (default: the user's data directory,
``$XDG_DATA_HOME/taskbox`` or ``~/.local/share/taskbox``). Settings come from built-in
defaults, then ``$TASKBOX_HOME/config.toml``, then ``TASKBOX_<NAME>`` environment variables.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from .errors import InvalidInput

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(value: str | int, what: str = "size") -> int:
    """Parse ``512m``/``2g``/``10k``/bytes (powers of 1024) into bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise InvalidInput(f"{what} {value!r} is not a size like 512m or 2g")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))


def default_home() -> Path:
    env = os.environ.get("TASKBOX_HOME")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(base) / "taskbox").resolve()


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class Settings:
    """Tunable settings; each field's metadata ``doc`` feeds the generated settings table."""

    image: str = _setting("taskbox-sandbox:latest", "Sandbox image new tasks use.")
    memory: str = _setting("2g", "Default container memory limit (minimum 64m).")
    cpus: float = _setting(1.0, "Default container CPU limit, in cores (minimum 0.1).")
    pids_limit: int = _setting(512, "Default maximum number of processes in a container.")
    workspace_quota: str = _setting(
        "10g", "Default disk quota of a task's workspace (minimum 64m): the workspace is its own "
        "filesystem image of this size, mounted at the workspace path; needs root and loop devices. "
        "`0` turns quotas off (plain directories; the host disk is unprotected)."
    )
    workspace_inodes: int = _setting(
        1_000_000, "Default inode quota (most files and directories) of a task's workspace (minimum 1000; "
        "`0`: the filesystem's default of one per 16 KiB)."
    )
    max_memory: str = _setting(
        "64g", "Most memory a task may be given (also never more than the machine running the containers has)."
    )
    max_cpus: float = _setting(
        16.0, "Most CPU cores a task may be given (also never more than the machine has)."
    )
    max_pids: int = _setting(4096, "Most processes a task's container may be allowed.")
    network: str = _setting(
        "none", "Default network mode: `none`, `allowlist` (egress proxy) or `open` (warned about)."
    )
    runtime: str = _setting(
        "auto", "Container runtime: `auto` (gVisor `runsc` when the engine has it), `default`, or a name."
    )
    egress_network: str = _setting(
        "taskbox-egress", "Docker network the egress proxies reach allowed domains through "
        "(created as a bridge if missing; an existing one is used as is)."
    )
    proxy_image: str = _setting("taskbox-proxy:latest", "Egress proxy image (`taskbox image build --proxy`).")
    pressure_warning: float = _setting(70.0, "Memory use (% of the limit) that raises a warning event.")
    pressure_critical: float = _setting(85.0, "Memory use (% of the limit) that takes a checkpoint.")
    pressure_emergency: float = _setting(
        95.0, "Memory use (% of the limit) that takes an emergency checkpoint and pauses the task."
    )
    pressure_interval: float = _setting(10.0, "Seconds between memory samples of the pressure monitor.")
    idle_pause_minutes: int = _setting(
        30, "Minutes an active task with no attached agent keeps its container running before the "
        "`tick` housekeeping pauses it (0: never)."
    )
    lease_seconds: int = _setting(300, "How long an agent's lease on a task lasts unless renewed.")
    collaborative_max_agents: int = _setting(4, "Most agents attached to a collaborative task.")
    exec_agent: bool = _setting(
        True, "Run commands through a small exec agent inside each new container (a unix socket, no "
        "`docker exec` per command; see docs/speed.md). Off: every command is a `docker exec`."
    )
    pool_size: int = _setting(
        0, "Warm pool: pre-started, unassigned sandboxes of the default profile (image, limits, network "
        "`none`/`open`) the housekeeping loop keeps ready, so a create with that profile claims one "
        "instead of starting a container (docs/speed.md; about 7 MiB of memory per slot). With workspace quotas on, "
        "as many workspace volumes of the default quota are made ahead (no `mkfs` in a create; about 4 MiB of "
        "disk each). `0`: off. Needs root."
    )
    exec_timeout: int = _setting(600, "Default timeout of a command run in a task, in seconds.")
    run_timeout: int = _setting(
        3600, "Seconds a non-interactive `taskbox run` (an agent given a prompt) may take before it is killed."
    )
    run_checkpoint: int = _setting(0, "1: take a checkpoint when an agent run (`taskbox run`) ends.")
    agents_image: str = _setting(
        "taskbox-sandbox-agents:latest", "Sandbox image with the agent CLIs (`taskbox image build --agents`); "
        "`create-task --run AGENT` uses it unless --image is given."
    )
    setup_timeout: int = _setting(
        900, "Seconds each setup command of a project (`.taskbox/config.toml`) may take after create."
    )
    exec_output_limit: int = _setting(
        1_000_000, "Most bytes of stdout and of stderr a command returns; the rest is cut."
    )
    sandbox_git_timeout: int = _setting(
        300, "Seconds taskbox's own git commands in a sandbox (commit, diff, bundle) may take before "
        "the host kills them."
    )
    fetch_limit: str = _setting(
        "2g", "Most bytes a task branch may pack to when it is fetched into the user's repository."
    )
    ultrawork_parallel: int = _setting(
        4, "Default number of sub-tasks an ultrawork run keeps running at once (a plan's `parallel` "
        "or `--parallel` wins)."
    )
    memory_on_branch: bool = _setting(
        False, "Commit a task's `.task-memory/` and `Plan.md` on its branch (the old behaviour) instead of "
        "on the companion ref `refs/taskbox/<branch>/memory` beside it; per task: `create-task --memory-on-branch`."
    )
    log_output_limit: int = _setting(
        4_000, "Most characters of a command's output kept in executions.jsonl."
    )
    retention_days: int = _setting(
        7, "Days a completed task keeps its container before `gc` archives it."
    )
    checkpoint_max_per_task: int = _setting(
        20, "Most checkpoints kept per task; the oldest unnamed, unpinned ones are pruned first."
    )
    checkpoint_max_age_days: int = _setting(
        30, "Days after which unnamed, unpinned checkpoints are pruned (0: never by age)."
    )
    record_burst: int = _setting(
        20, "Audit entries and events of one kind a task may record one by one per `record_window`; "
        "the rest are counted into one aggregated record."
    )
    record_window: float = _setting(60.0, "Seconds of the rate-limit window of audit entries and events.")
    audit_max_bytes: int = _setting(
        10 * 1024**2, "Size at which a task's audit log is rotated (one older generation is kept)."
    )
    archive_max_bytes: int = _setting(
        10 * 1024**3, "Most bytes an imported archive (e.g. `checkpoint import`) may expand to; counted "
        "while it is read, so a decompression bomb is refused early."
    )
    backup_interval_minutes: int = _setting(
        60, "Most minutes between two online backups of the registry (taken when a command writes to it; "
        "0: only before migrations and on `taskbox doctor --backup`)."
    )
    backup_keep: int = _setting(10, "Registry backups kept under `TASKBOX_HOME/backups` (the oldest go first).")
    trash_days: int = _setting(
        7, "Days an orphan workspace or container `doctor --fix` moved to the trash is kept before "
        "`doctor --fix` purges it (0: purged by the next `doctor --fix`)."
    )
    archive_max_members: int = _setting(1_000_000, "Most members (files, directories, links) an imported archive may have.")
    archive_max_ratio: float = _setting(
        100.0, "Most an imported archive may expand relative to its compressed size (applies past 16 MiB; "
        "0: no ratio limit)."
    )

    @classmethod
    def load(cls, home: Path) -> Settings:
        values: dict[str, Any] = {}
        path = home / "config.toml"
        if path.exists():
            try:
                values.update(tomllib.loads(path.read_text()))
            except tomllib.TOMLDecodeError as exc:
                raise InvalidInput(f"{path}: invalid TOML: {exc}") from exc
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            env = os.environ.get(f"TASKBOX_{name.upper()}")
            if env is not None:
                values[name] = env
        unknown = set(values) - set(fields)
        if unknown:
            raise InvalidInput(f"unknown settings: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            typ: Any = type(fields[name].default)
            if typ is bool and isinstance(value, str):  # from the environment: bool("0") would be True
                flag = {"1": True, "true": True, "yes": True, "on": True,
                        "0": False, "false": False, "no": False, "off": False}.get(value.strip().lower())
                if flag is None:
                    raise InvalidInput(f"setting {name}: expected true or false, got {value!r}")
                value = flag
            try:
                kwargs[name] = typ(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"setting {name}: expected {typ.__name__}, got {value!r}") from exc
        return cls(**kwargs)


_project_cache: dict[tuple[Path, Callable[[str, Path], Any]], tuple[tuple[int, int], Any]] = {}
_project_lock = threading.Lock()


def load_project_file(path: Path, parse: Callable[[str, Path], T]) -> T | None:
    """Read a project config file (e.g. ``.taskbox/policy.toml``) and ``parse(text, path)`` it; None if absent.

    These files are consulted on every tool call, so the parsed result is cached until the
    file's mtime or size changes. Unreadable or non-UTF-8 files are :class:`InvalidInput`.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    key = (st.st_mtime_ns, st.st_size)
    with _project_lock:
        hit = _project_cache.get((path, parse))
        if hit and hit[0] == key:
            return cast(T, hit[1])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    value = parse(text, path)
    with _project_lock:
        _project_cache[(path, parse)] = (key, value)
    return value


@dataclass(frozen=True)
class Paths:
    """The layout of ``TASKBOX_HOME``."""

    home: Path

    @property
    def db(self) -> Path:
        return self.home / "registry.db"

    @property
    def workspaces(self) -> Path:
        return self.home / "workspaces"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def volumes(self) -> Path:
        """Filesystem images of workspaces with a quota (outside every workspace: no sandbox reaches them)."""
        return self.home / "volumes"

    @property
    def backups(self) -> Path:
        """Rotated online backups of the registry (``registry-<UTC time>.db``)."""
        return self.home / "backups"

    @property
    def trash(self) -> Path:
        """Orphan workspaces, volumes and containers `doctor --fix` set aside, kept ``trash_days``."""
        return self.home / "trash"

    @property
    def identity(self) -> Path:
        """This home's identity: written once the registry exists, so a vanished registry is noticed."""
        return self.home / "home.json"

    @property
    def records(self) -> Path:
        """One JSON record per task, mirrored by the registry: the trusted source of a rebuild."""
        return self.home / "records"

    @property
    def pool(self) -> Path:
        """The warm pool's slots (a shared mount; see :mod:`taskbox.pool`)."""
        return self.home / "pool"

    @property
    def checkpoint_stores(self) -> Path:
        return self.home / "checkpoints"

    def workspace(self, task_id: str) -> Path:
        return self.workspaces / task_id

    def volume(self, task_id: str) -> Path:
        return self.volumes / f"{task_id}.img"

    def ensure(self) -> None:
        for d in (self.home, self.workspaces, self.locks):
            d.mkdir(parents=True, exist_ok=True)
