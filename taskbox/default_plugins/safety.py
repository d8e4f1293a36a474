"""Built-in plugin: sandbox safety (SPEC §6).

- ``pre_tool_call``: the project policy decides on every tool call (allow, checkpoint first,
  or deny with :class:`~taskbox.errors.PolicyDenied`); each decision is audited.
- ``sandbox_spec``: the runtime, capabilities, seccomp choice and — in ``allowlist`` mode —
  the egress proxy's rules (project policy plus the task's own domains) go on the spec.
- ``post_tool_call``: an OOM kill becomes a ``task.oom_killed`` event; new egress-proxy
  decisions are copied into the audit log (denials also as ``egress.denied`` events); the
  memory pressure level is re-sampled.
- ``task_start``: every way the task is weaker than the default profile is recorded as a
  ``sandbox.weakened`` event (the CLI prints the same list as warnings).
- ``tick``: memory pressure of every running task, pending egress decisions, and the
  aggregated records of closed rate-limit windows.
"""

from __future__ import annotations

from typing import Any

from .. import network, policy, pressure
from ..errors import TaskboxError
from ..hookspecs import hookimpl
from ..models import Status
from ..sandbox import ContainerSpec, ExecResult, weakened


def sandbox_options(task: Any) -> dict[str, Any]:
    """The task's own sandbox options (``metadata["sandbox"]``): domains, runtime, capabilities…"""
    meta = task.metadata if isinstance(task.metadata, dict) else {}
    own = meta.get("sandbox") or {}
    return own if isinstance(own, dict) else {}


def warnings(service: Any, task: Any) -> list[str]:
    """How the task's sandbox is weaker than the default profile, one sentence each."""
    own = sandbox_options(task)
    spec = ContainerSpec(name=task.id, image=task.image, workspace=task.workspace_path, labels={},
                         memory=task.memory_limit, cpus=task.cpu_limit, pids_limit=task.pids_limit,
                         network=task.network, runtime=own.get("runtime") or service.settings.runtime,
                         cap_add=list(own.get("cap_add") or []), seccomp=own.get("seccomp", "default"))
    out = weakened(spec, default_pids=max(service.settings.pids_limit, 512),
                   default_memory=service.settings.memory)
    meta = task.metadata if isinstance(task.metadata, dict) else {}
    if not meta.get("quota"):
        out.append("the workspace has no disk or inode quota (workspace_quota = 0): the task can fill the host disk")
    if task.network == "allowlist":
        rules = network.task_rules(service, task)
        if any(r.kind == "address" for r in rules.allow) or rules.allow_private:
            out.append("the allowlist lets the task reach IP addresses or private networks directly")
    return out


@hookimpl(tryfirst=True)
def pre_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any]) -> None:
    policy.check(service, task, tool, args)


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
        spec.egress = network.EgressConfig(network.task_rules(service, task),
                                           outside_network=service.settings.egress_network,
                                           image=service.settings.proxy_image)


@hookimpl
def post_tool_call(service: Any, task: Any, tool: str, args: dict[str, Any], result: Any) -> None:
    if tool != "exec" or not isinstance(result, ExecResult):
        return
    if result.oom_killed:
        command = str(args.get("command")) if args.get("log", True) else policy.NOT_LOGGED
        service.registry.add_event("task.oom_killed", task.id, {
            "command": command[:200], "exit_code": result.exit_code, "memory_limit": task.memory_limit})
        policy.audit(service, task.id, kind="resource", decision="oom-killed", rule="memory-limit",
                     subject=command[:1000], memory_limit=task.memory_limit)
    try:
        network.sync_log(service, task)
        pressure.check_task(service, service.get(task.id), engine=False)
    except TaskboxError as exc:  # bookkeeping must not turn a finished command into an error
        service.registry.add_event("safety.bookkeeping_failed", task.id, {"error": exc.message[:300]})


@hookimpl
def task_start(service: Any, task: Any) -> None:
    found = warnings(service, task)
    if found:
        service.registry.add_event("sandbox.weakened", task.id, {"warnings": found})
        for w in found:
            policy.audit(service, task.id, kind="sandbox", decision="weakened", rule="default-profile", subject=w)


@hookimpl
def tick(service: Any) -> None:
    policy.flush_records(service)  # aggregated audit entries and events of closed rate-limit windows
    pressure.check_all(service)
    for task in service.registry.list_tasks([str(Status.ACTIVE), str(Status.PAUSED)]):
        if task.network == "allowlist":
            try:
                network.sync_log(service, task)
            except TaskboxError:
                continue
