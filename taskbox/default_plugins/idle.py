"""Built-in plugin: pause active tasks nobody is attached to (SPEC §1, "stopped when idle").

On each ``tick``, an active task with no live lease whose last activity is older than the
``idle_pause_minutes`` setting has its container stopped (filesystem kept) and becomes
``paused``; the next attach or command starts it again.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import TaskboxError
from ..hookspecs import hookimpl
from ..models import Status


@hookimpl
def tick(service: Any) -> None:
    minutes = service.settings.idle_pause_minutes
    if minutes <= 0:
        return
    cutoff = time.time() - minutes * 60
    for task in service.registry.list_tasks([str(Status.ACTIVE)]):
        if task.last_active > cutoff or task.pending_op or service.registry.leases(task.id):
            continue
        try:
            service.pause(task.id)
        except TaskboxError as exc:  # e.g. it just became busy again: try next tick
            service.registry.add_event("task.idle_pause_failed", task.id, {"error": exc.message[:300]})
            continue
        service.registry.add_event("task.idle_paused", task.id, {"idle_minutes": minutes})
