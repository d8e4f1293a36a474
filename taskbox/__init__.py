"""taskbox: a persistent Docker sandbox, git branch and durable memory for every coding task.

The names below are the public API that plugins and scripts may rely on.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointCorrupted,
    CommandCancelled,
    CommandTimeout,
    ConcurrentModification,
    Conflict,
    DockerUnavailable,
    GitError,
    ImageMissing,
    InvalidInput,
    InvalidTransition,
    MemoryCorrupted,
    NotFound,
    PathOutsideWorkspace,
    PolicyDenied,
    RegistryDamaged,
    RegistryError,
    RegistryFull,
    RegistryLocked,
    RegistryMissing,
    RegistryPermission,
    SandboxError,
    TaskboxError,
    TaskBusy,
    TaskLocked,
    TaskNotFound,
    UnsafeArchive,
    VolumeError,
    WorkspaceFull,
)
from .models import ContainerState, LockMode, Session, Status, Task

if TYPE_CHECKING:
    from .hookspecs import hookimpl
    from .sandbox import ExecResult
    from .service import AttachResult, TaskService

# Loaded on first use: `taskbox mcp` and `taskbox --help` must not pay for Docker's client,
# pluggy and the service before they answer.
_LAZY = {"hookimpl": "hookspecs", "ExecResult": "sandbox", "AttachResult": "service", "TaskService": "service"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if n.startswith("_")})

__all__ = [
    "AttachResult",
    "CheckpointCorrupted",
    "CommandCancelled",
    "CommandTimeout",
    "ConcurrentModification",
    "Conflict",
    "ContainerState",
    "DockerUnavailable",
    "ExecResult",
    "GitError",
    "ImageMissing",
    "InvalidInput",
    "InvalidTransition",
    "LockMode",
    "MemoryCorrupted",
    "NotFound",
    "PathOutsideWorkspace",
    "PolicyDenied",
    "RegistryDamaged",
    "RegistryError",
    "RegistryFull",
    "RegistryLocked",
    "RegistryMissing",
    "RegistryPermission",
    "SandboxError",
    "Session",
    "Status",
    "Task",
    "TaskBusy",
    "TaskLocked",
    "TaskNotFound",
    "TaskService",
    "TaskboxError",
    "UnsafeArchive",
    "VolumeError",
    "WorkspaceFull",
    "__version__",
    "hookimpl",
]
