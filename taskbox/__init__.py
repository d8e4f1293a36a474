"""taskbox: a persistent Docker sandbox, git branch and durable memory for every coding task.

The names below are the public API that plugins and scripts may rely on.
"""

__version__ = "0.1.0"

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
    SandboxError,
    TaskboxError,
    TaskBusy,
    TaskLocked,
    TaskNotFound,
    UnsafeArchive,
    VolumeError,
    WorkspaceFull,
)
from .hookspecs import hookimpl
from .models import ContainerState, LockMode, Session, Status, Task
from .sandbox import ExecResult
from .service import AttachResult, TaskService

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
