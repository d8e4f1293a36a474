"""The taskbox exception hierarchy.

Every error taskbox raises on purpose is a :class:`TaskboxError`. Adapters render them:
the CLI prints one line and exits with :attr:`TaskboxError.exit_code`, the MCP server
returns a tool error, the web API a JSON body with :attr:`TaskboxError.http_status`.

    TaskboxError                    exit 1
    ├── InvalidInput                exit 2   bad argument, unsafe description, not a git repo
    │   ├── InvalidTransition       exit 2   e.g. completing a pending task
    │   ├── PathOutsideWorkspace    exit 2   a path or workdir that escapes the workspace
    │   └── UnsafeArchive           exit 2   an archive member escapes, links out or is a device
    ├── NotFound                    exit 3
    │   └── TaskNotFound            exit 3
    ├── Conflict                    exit 4
    │   ├── TaskLocked              exit 4   another agent holds the task's lease
    │   ├── TaskBusy                exit 4   a command or job runs in the task: the container cannot stop now
    │   └── ConcurrentModification  exit 4   a lost optimistic-locking race: retry
    ├── DockerUnavailable           exit 5   the engine cannot be reached (says how to start it)
    ├── ImageMissing                exit 5   the sandbox image is not built
    ├── SandboxError                exit 6   a container operation failed
    │   ├── CommandTimeout          exit 6
    │   ├── CommandCancelled        exit 6   the caller cancelled a command; it was killed
    │   ├── VolumeError             exit 6   a workspace volume (disk quota) could not be made or mounted
    │   └── WorkspaceFull           exit 6   a host-side write found the workspace's disk or inode quota used up
    ├── GitError                    exit 7   a git command failed (command, code, stderr)
    ├── MemoryCorrupted             exit 8   task memory could not be read or rebuilt
    ├── CheckpointCorrupted         exit 8   a checkpoint's stored data is damaged or missing
    ├── PolicyDenied                exit 9   the project policy refuses a command, file or limit
    └── RegistryError               exit 10  the registry database cannot be used (each says how to recover)
        ├── RegistryMissing         exit 10  registry.db is gone or empty while the home holds tasks
        ├── RegistryDamaged         exit 10  registry.db is not a sound database: restore or rebuild it
        ├── RegistryLocked          exit 10  another process held the database's lock too long: retry
        ├── RegistryFull            exit 10  the disk holding TASKBOX_HOME is full or failing (I/O error)
        └── RegistryPermission      exit 10  the database or its directory cannot be read or written

SQLite errors never reach an adapter: the registry translates each one at its boundary
(:func:`taskbox.registry.translate`) into a :class:`RegistryError` with ``raise … from exc``.
"""

from __future__ import annotations

from typing import Any


class TaskboxError(Exception):
    """Base class of every error taskbox raises on purpose."""

    exit_code = 1
    http_status = 500
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class InvalidInput(TaskboxError):
    exit_code = 2
    http_status = 400
    code = "invalid_input"


class InvalidTransition(InvalidInput):
    code = "invalid_transition"


class PathOutsideWorkspace(InvalidInput):
    code = "path_outside_workspace"


class UnsafeArchive(InvalidInput):
    code = "unsafe_archive"


class NotFound(TaskboxError):
    exit_code = 3
    http_status = 404
    code = "not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id!r} (see `taskbox list-tasks`)", task_id=task_id)


class Conflict(TaskboxError):
    exit_code = 4
    http_status = 409
    code = "conflict"


class TaskLocked(Conflict):
    code = "task_locked"


class TaskBusy(Conflict):
    """A command or background job runs in the task, so its container must not be stopped now.

    ``details["running"]`` lists them; the caller may wait, kill them, or retry with the
    operation's ``kill_running`` option.
    """

    code = "task_busy"


class ConcurrentModification(Conflict):
    code = "concurrent_modification"


class DockerUnavailable(TaskboxError):
    exit_code = 5
    http_status = 503
    code = "docker_unavailable"


class ImageMissing(TaskboxError):
    exit_code = 5
    http_status = 503
    code = "image_missing"


class SandboxError(TaskboxError):
    exit_code = 6
    http_status = 500
    code = "sandbox_error"


class CommandTimeout(SandboxError):
    code = "command_timeout"


class CommandCancelled(SandboxError):
    """The caller cancelled a running command (or its connection dropped); its processes were killed."""

    code = "command_cancelled"


class VolumeError(SandboxError):
    """A task's workspace volume (its disk and inode quota) could not be made, mounted or released."""

    code = "volume_error"


class WorkspaceFull(SandboxError):
    """A host-side write into a workspace failed: its disk or inode quota is used up (ENOSPC)."""

    code = "workspace_full"


class GitError(TaskboxError):
    exit_code = 7
    http_status = 500
    code = "git_error"


class MemoryCorrupted(TaskboxError):
    exit_code = 8
    http_status = 500
    code = "memory_corrupted"


class CheckpointCorrupted(TaskboxError):
    exit_code = 8
    http_status = 500
    code = "checkpoint_corrupted"


class PolicyDenied(TaskboxError):
    """The project policy (``.taskbox/policy.toml``) refused a tool call, a limit or a mount."""

    exit_code = 9
    http_status = 403
    code = "policy_denied"


class RegistryError(TaskboxError):
    """The registry database cannot be used; the message says how to recover."""

    exit_code = 10
    http_status = 503
    code = "registry_error"


class RegistryMissing(RegistryError):
    """``registry.db`` is missing or empty although this home held a registry (or still holds tasks).

    It is never silently re-created empty: that would make every workspace look like an orphan.
    """

    code = "registry_missing"


class RegistryDamaged(RegistryError):
    """``registry.db`` is not a sound SQLite database (e.g. its first bytes were overwritten)."""

    code = "registry_damaged"


class RegistryLocked(RegistryError):
    """Another process held the registry's write lock past the busy timeout."""

    code = "registry_locked"


class RegistryFull(RegistryError):
    """A registry write failed for lack of disk space, or with a disk I/O error."""

    code = "registry_full"


class RegistryPermission(RegistryError):
    """The registry database or its directory cannot be opened or written (permissions, read-only)."""

    code = "registry_permission"
