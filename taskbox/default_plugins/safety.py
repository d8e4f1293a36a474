"""Built-in plugin: sandbox safety (SPEC §6).

- ``pre_tool_call``: the project policy decides on every operation (allow, ask the core for
  a checkpoint first, or deny with :class:`~taskbox.errors.PolicyDenied`); each decision is
  audited.
- ``sandbox_spec``: the runtime, capabilities, seccomp choice and — in ``allowlist`` mode —
  the egress proxy's rules (project policy plus the task's own domains) go on the spec.
- ``post_tool_call``: an OOM kill becomes a ``task.oom_killed`` event; new egress-proxy
  decisions are copied into the audit log (denials also as ``egress.denied`` events); the
  memory pressure level is re-sampled.
- ``task_start``: every way the task is weaker than the default profile
  (:meth:`~taskbox.service.TaskService.sandbox_warnings`) is recorded as a
  ``sandbox.weakened`` event.
- ``tick``: memory pressure of every running task, pending egress decisions, and the
  aggregated records of closed rate-limit windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import network
from ..audit import NOT_LOGGED
from ..errors import PolicyDenied, TaskboxError
from ..hookspecs import hookimpl
from ..models import CheckpointRequest, Status
from ..sandbox import ExecResult


def sandbox_options(task: Any) -> dict[str, Any]:
    """The task's own sandbox options (``metadata["sandbox"]``): domains, runtime, capabilities…"""
    meta = task.metadata if isinstance(task.metadata, dict) else {}
    own = meta.get("sandbox") or {}
    return own if isinstance(own, dict) else {}


@hookimpl(tryfirst=True)
def pre_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any]) -> CheckpointRequest | None:
    """The project policy decides (allow, checkpoint first, deny); every decision is audited."""
    pol = service.policy_for(task)
    decision = pol.evaluate(tool, args, Path(task.repo_path))
    # A call made with log=False is decided on its text but recorded without it.
    subject = decision.subject if args.get("log", True) else NOT_LOGGED
    service.audit.record(task.id, kind="tool", decision=decision.action, rule=decision.rule, subject=subject,
                         tool=tool, reason=decision.reason, risk=decision.risk)
    if decision.action == "deny":
        service.registry.add_event("policy.denied", task.id, {"tool": tool, "rule": decision.rule,
                                                              "subject": subject[:300],
                                                              "reason": decision.reason}, sample=decision.rule)
        raise PolicyDenied(f"refused by the project policy ({decision.rule}): {decision.reason}",
                           rule=decision.rule, tool=tool)
    if decision.action == "checkpoint":
        short = subject if len(subject) <= 100 else subject[:97] + "..."
        return CheckpointRequest("policy", service.redactor.text(f"policy rule {decision.rule} before `{short}`"),
                                 required=True, rule=decision.rule)
    return None


@hookimpl
def sandbox_spec(service: Any, task: Any, spec: Any) -> None:
    own = sandbox_options(task)
    spec.runtime = own.get("runtime") or service.settings.runtime
    spec.cap_add = list(own.get("cap_add") or [])
    spec.seccomp = own.get("seccomp", "default")
    if own.get("nofile"):
        spec.nofile = int(own["nofile"])
    if own.get("fsize"):
        spec.fsize = int(own["fsize"])
    if spec.network == "allowlist":
        spec.egress = network.EgressConfig(service.egress_rules(task),
                                           outside_network=service.settings.egress_network,
                                           image=service.settings.proxy_image)


@hookimpl
def post_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any], result: Any) -> None:
    if tool != "exec" or not isinstance(result, ExecResult):
        return
    if result.oom_killed:
        command = str(args.get("command")) if args.get("log", True) else NOT_LOGGED
        service.registry.add_event("task.oom_killed", task.id, {
            "command": command[:200], "exit_code": result.exit_code, "memory_limit": task.memory_limit})
        service.audit.record(task.id, kind="resource", decision="oom-killed", rule="memory-limit",
                             subject=command[:1000], memory_limit=task.memory_limit)
    try:
        service.sync_egress_log(task)
        service.check_pressure(service.get(task.id), engine=False)
    except TaskboxError as exc:  # bookkeeping must not turn a finished command into an error
        service.registry.add_event("safety.bookkeeping_failed", task.id, {"error": exc.message[:300]})


@hookimpl
def task_start(service: Any, task: Any) -> None:
    found = service.sandbox_warnings(task)
    if found:
        service.registry.add_event("sandbox.weakened", task.id, {"warnings": found})
        for w in found:
            service.audit.record(task.id, kind="sandbox", decision="weakened", rule="default-profile", subject=w)


@hookimpl
def tick(service: Any) -> None:
    service.audit.flush()  # aggregated audit entries and events of closed rate-limit windows
    service.check_pressure_all()
    for task in service.registry.list_tasks([str(Status.ACTIVE), str(Status.PAUSED)]):
        if task.network == "allowlist":
            try:
                service.sync_egress_log(task)
            except TaskboxError:
                continue
