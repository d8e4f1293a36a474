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
run. OOM kills themselves are detected per command by :meth:`taskbox.sandbox.Sandbox.exec`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import TaskboxError
from .models import ContainerState, Status

if TYPE_CHECKING:
    from .models import Task
    from .service import TaskService

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


def thresholds(service: TaskService) -> tuple[float, float, float]:
    s = service.settings
    return (float(s.pressure_warning), float(s.pressure_critical), float(s.pressure_emergency))


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


def sample(service: TaskService, task: Task, *, engine: bool = True) -> Sample | None:
    """The task's memory use now, or None when its container does not run.

    ``engine=False`` reads only the cgroup files on this host (fast), never the stats API.
    """
    if not task.container_id:
        return None
    try:
        usage = service.sandbox.memory_usage(task.container_id, engine=engine)
    except TaskboxError:
        return None
    if not usage or not usage["limit"]:
        return None
    pct = round(100.0 * usage["usage"] / usage["limit"], 2)
    return Sample(task.id, usage["usage"], usage["limit"], pct, usage["pids"], level_for(pct, thresholds(service)))


def check_task(service: TaskService, task: Task, current: Sample | None = None, *,
               engine: bool = True) -> Sample | None:
    """Sample one task and act on a level it newly reached (see the module docstring)."""
    current = current or sample(service, task, engine=engine)
    if current is None and not engine:
        return None  # no fast reading here: leave the level to the next full sample
    previous = str((task.metadata.get("pressure") or {}).get("level", "ok"))
    level = current.level if current else "ok"
    if level == previous:
        return current
    _remember(service, task.id, level, current)
    if current is None or LEVELS.index(level) < LEVELS.index(previous):
        if current is not None:
            service.registry.add_event("resource.recovered", task.id, {"from": previous, **current.to_dict()})
        return current
    detail = {"from": previous, **current.to_dict()}
    service.registry.add_event(f"resource.{level}", task.id, detail)
    if level == "critical":
        _checkpoint(service, task, "resource-pressure", f"memory at {current.percent}% of the limit")
    elif level == "emergency":
        _checkpoint(service, task, "emergency", f"memory at {current.percent}% of the limit: emergency")
        try:
            if service.get(task.id).status is Status.ACTIVE:
                service.pause(task.id, kill_running=True)  # the running work is what overflows
                service.registry.add_event("resource.paused", task.id, detail)
        except TaskboxError as exc:
            service.registry.add_event("resource.pause_failed", task.id, {"error": exc.message[:300]})
        _remember(service, task.id, "ok", None)  # the container is stopped: start afresh next time
    return current


def check_all(service: TaskService) -> list[Sample]:
    """Sample every running task of this home and act on new levels."""
    out = []
    for task in service.registry.list_tasks([str(Status.ACTIVE)]):
        if task.container_state is not ContainerState.RUNNING:
            continue
        s = check_task(service, task)
        if s is not None:
            out.append(s)
    return out


def _remember(service: TaskService, task_id: str, level: str, current: Sample | None) -> None:
    def apply(meta: dict[str, Any]) -> None:
        meta["pressure"] = {"level": level, "at": time.time(),
                            "percent": current.percent if current else None}

    try:
        service.update_metadata(task_id, apply)
    except TaskboxError:
        pass


def _checkpoint(service: TaskService, task: Task, trigger: str, reason: str) -> None:
    try:
        service.create_checkpoint(task.id, None, trigger=trigger, reason=reason)
    except TaskboxError as exc:
        service.registry.add_event("resource.checkpoint_failed", task.id,
                                   {"trigger": trigger, "error": exc.message[:300]})


class Monitor:
    """A daemon thread that runs the service's ``tick`` (pressure sampling, idle pause, …) every ``interval`` seconds."""

    def __init__(self, service: TaskService, interval: float | None = None) -> None:
        self.service = service
        self.interval = float(interval if interval is not None else service.settings.pressure_interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskbox-pressure", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.service.tick()  # pressure sampling is the safety plugin's tick
            except Exception as exc:  # the monitor thread must outlive any one failed round
                message = exc.message if isinstance(exc, TaskboxError) else f"{type(exc).__name__}: {exc}"
                self.service.registry.add_event("resource.monitor_error", None, {"error": message[:300]})
