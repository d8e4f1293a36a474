"""Resource pressure: memory use sampled from the engine, and what taskbox does about it.

A task's memory use (without reclaimable page cache, as ``docker stats`` shows it) is
compared with its limit. Crossing a level upwards acts once, then not again until the task
has come back below it:

============  ==========  ==================================================================
level         default     action
============  ==========  ==================================================================
warning       70 %        a ``resource.warning`` event
critical      85 %        a ``resource.critical`` event and a checkpoint
emergency     95 %        a ``resource.emergency`` event, an emergency checkpoint, and the
                          task paused (container stopped, filesystem kept)
============  ==========  ==================================================================

The thresholds are the ``pressure_*`` settings. Sampling happens on every ``tick`` (doctor,
long-running servers), after every command, and in a :class:`Monitor` thread a server may
run. This module measures and decides (:func:`transition`); the service acts
(:meth:`taskbox.service.TaskService.check_pressure`). OOM kills themselves are detected per command by :meth:`taskbox.sandbox.Sandbox.exec`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import TaskboxError

if TYPE_CHECKING:
    from .models import Task
    from .sandbox import Sandbox

LEVELS = ("ok", "warning", "critical", "emergency")


@dataclass
class Sample:
    task_id: str
    usage: int
    limit: int
    percent: float
    pids: int
    level: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Transition:
    """A task's pressure level changed: from ``previous`` to ``level``, and what to do about it.

    ``action`` is ``recovered`` (back below a level), ``event`` (warning), ``checkpoint``
    (critical) or ``pause`` (emergency: checkpoint, then stop the container).
    ``remember`` is the level to keep in the task's metadata.
    """

    previous: str
    level: str
    action: str
    remember: str
    sample: Sample | None


def thresholds(settings: Any) -> tuple[float, float, float]:
    return (float(settings.pressure_warning), float(settings.pressure_critical), float(settings.pressure_emergency))


def level_for(percent: float, limits: tuple[float, float, float]) -> str:
    """The pressure level of ``percent`` of the memory limit."""
    warning, critical, emergency = limits
    if percent >= emergency:
        return "emergency"
    if percent >= critical:
        return "critical"
    if percent >= warning:
        return "warning"
    return "ok"


def sample(sandbox: Sandbox, task: Task, limits: tuple[float, float, float], *,
           engine: bool = True) -> Sample | None:
    """The task's memory use now, or None when its container does not run.

    ``engine=False`` reads only the cgroup files on this host (fast), never the stats API.
    """
    if not task.container_id:
        return None
    try:
        usage = sandbox.memory_usage(task.container_id, engine=engine)
    except TaskboxError:
        return None
    if not usage or not usage["limit"]:
        return None
    pct = round(100.0 * usage["usage"] / usage["limit"], 2)
    return Sample(task.id, usage["usage"], usage["limit"], pct, usage["pids"], level_for(pct, limits))


def transition(task: Task, current: Sample | None) -> Transition | None:
    """What a new sample means for the task: None when its level did not change."""
    previous = str((task.metadata.get("pressure") or {}).get("level", "ok"))
    level = current.level if current else "ok"
    if level == previous:
        return None
    if current is None or LEVELS.index(level) < LEVELS.index(previous):
        return Transition(previous, level, "recovered", level, current)
    action = {"warning": "event", "critical": "checkpoint", "emergency": "pause"}[level]
    # After an emergency the container is stopped: start afresh next time.
    return Transition(previous, level, action, "ok" if action == "pause" else level, current)


class Monitor:
    """A daemon thread that calls ``tick`` (pressure sampling, idle pause, …) every ``interval`` seconds.

    A failed round is passed to ``on_error`` (one line) and the thread keeps going.
    """

    def __init__(self, tick: Callable[[], None], interval: float, on_error: Callable[[str], None]) -> None:
        self.tick = tick
        self.on_error = on_error
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskbox-housekeeping", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as exc:  # the monitor thread must outlive any one failed round
                self.on_error(exc.message if isinstance(exc, TaskboxError) else f"{type(exc).__name__}: {exc}")
