"""Task containers through the Docker Engine API: safe defaults, exec with bounds.

Containers idle (``sleep infinity`` under an init process) and commands run in them with
``docker exec``. Defaults follow SPEC §6: a non-root user, every capability dropped,
``no-new-privileges``, pids/memory/CPU limits, no network, no Docker socket, never privileged.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound
from docker.errors import NotFound as DockerNotFound
from docker.types import LogConfig, Ulimit

from .errors import CommandTimeout, ImageMissing, InvalidInput, SandboxError
from .models import ContainerState

LABEL_TASK = "taskbox.task"
LABEL_HOME = "taskbox.home"
CONTAINER_WORKSPACE = "/workspace"
SANDBOX_UID = 1000  # the image's `agent` user, used when taskbox itself runs as root
MIN_MEMORY = 64 * 1024**2
MIN_CPUS = 0.1
NETWORK_MODES = ("none", "open")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_memory(value: str | int) -> int:
    """Parse ``512m``/``2g``/bytes into bytes; refuse values under the sane minimum."""
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise InvalidInput(f"memory limit {value!r} is not a size like 512m or 2g")
        size = int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))
    if size < MIN_MEMORY:
        raise InvalidInput(f"memory limit {value!r} is below the minimum of 64m")
    return size


def check_cpus(value: float) -> float:
    if value < MIN_CPUS or value > (os.cpu_count() or 1):
        raise InvalidInput(f"cpu limit {value} must be between {MIN_CPUS} and {os.cpu_count()} cores")
    return value


def sandbox_owner() -> tuple[int, int]:
    """The uid:gid commands run as in the container, and that owns the workspace on the host.

    Matching the host user keeps the workspace editable by them; when taskbox runs as root,
    the image's unprivileged ``agent`` user is used instead, never root.
    """
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        return SANDBOX_UID, SANDBOX_UID
    return uid, gid


@dataclass
class ContainerSpec:
    name: str
    image: str
    workspace: Path
    labels: dict[str, str]
    memory: str = "2g"
    cpus: float = 1.0
    pids_limit: int = 512
    network: str = "none"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: float
    truncated: bool = False
    timed_out: bool = False
    oom_killed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sandbox:
    """Container operations for tasks; Docker errors are translated at this boundary."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.api = client.api

    def create(self, spec: ContainerSpec) -> str:
        """Create and start a task container; return its id."""
        if spec.network not in NETWORK_MODES:
            raise InvalidInput(f"network mode {spec.network!r} is not one of {', '.join(NETWORK_MODES)}")
        mem = parse_memory(spec.memory)
        check_cpus(spec.cpus)
        uid, gid = sandbox_owner()
        host_config = self.api.create_host_config(
            binds={str(spec.workspace): {"bind": CONTAINER_WORKSPACE, "mode": "rw"}},
            network_mode="none" if spec.network == "none" else "bridge",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            pids_limit=spec.pids_limit,
            mem_limit=mem,
            memswap_limit=mem,  # no swap beyond the memory limit
            nano_cpus=int(spec.cpus * 1e9),
            init=True,
            privileged=False,
            ulimits=[Ulimit(name="nofile", soft=4096, hard=4096)],
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"}),
        )
        try:
            created = self.api.create_container(
                spec.image,
                command=["sleep", "infinity"],
                name=spec.name,
                user=f"{uid}:{gid}",
                working_dir=CONTAINER_WORKSPACE,
                environment={"HOME": "/home/agent", **spec.env},
                labels=spec.labels,
                host_config=host_config,
                network_disabled=spec.network == "none",
            )
            cid: str = created["Id"]
            self.api.start(cid)
        except ImageNotFound as exc:
            raise ImageMissing(
                f"sandbox image {spec.image} is not built; run `taskbox image build`"
            ) from exc
        except DockerException as exc:
            raise SandboxError(f"could not create container {spec.name}: {_explain(exc)}") from exc
        return cid

    def ensure_image(self, image: str) -> None:
        """Raise :class:`ImageMissing` (saying how to build it) unless ``image`` exists."""
        try:
            self.api.inspect_image(image)
        except ImageNotFound as exc:
            raise ImageMissing(f"sandbox image {image} is not built; run `taskbox image build`") from exc
        except DockerException as exc:
            raise SandboxError(f"could not inspect image {image}: {_explain(exc)}") from exc

    def start(self, cid: str) -> None:
        try:
            self.api.start(cid)
        except DockerException as exc:
            raise SandboxError(f"could not start container {cid[:12]}: {_explain(exc)}") from exc

    def stop(self, cid: str, timeout: int = 2) -> None:
        try:
            self.api.stop(cid, timeout=timeout)
        except DockerNotFound:
            pass
        except DockerException as exc:
            raise SandboxError(f"could not stop container {cid[:12]}: {_explain(exc)}") from exc

    def remove(self, cid: str) -> None:
        try:
            self.api.remove_container(cid, force=True, v=True)
        except DockerNotFound:
            pass
        except DockerException as exc:
            raise SandboxError(f"could not remove container {cid[:12]}: {_explain(exc)}") from exc

    def state(self, cid: str | None) -> ContainerState:
        if not cid:
            return ContainerState.NONE
        try:
            info = self.api.inspect_container(cid)
        except DockerNotFound:
            return ContainerState.LOST
        except DockerException as exc:
            raise SandboxError(f"could not inspect container {cid[:12]}: {_explain(exc)}") from exc
        st = info["State"]
        if st.get("OOMKilled") and not st.get("Running"):
            return ContainerState.OOM_KILLED
        return ContainerState.RUNNING if st.get("Running") else ContainerState.STOPPED

    def task_containers(self, home_label: str) -> list[dict[str, Any]]:
        """Every container (running or not) labelled as belonging to this taskbox home."""
        try:
            return list(self.api.containers(all=True, filters={"label": f"{LABEL_HOME}={home_label}"}))
        except DockerException as exc:
            raise SandboxError(f"could not list containers: {_explain(exc)}") from exc

    def exec(
        self,
        cid: str,
        command: str | list[str],
        *,
        workdir: str = CONTAINER_WORKSPACE,
        timeout: float = 600,
        output_limit: int = 1_000_000,
        env: dict[str, str] | None = None,
    ) -> ExecResult:
        """Run ``command`` (a shell string or argv) in the container, bounded in time and output.

        The command runs under coreutils ``timeout`` in its own process group, so on expiry
        the whole group — background children included — is killed.
        """
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv:
            raise InvalidInput("empty command")
        secs = max(1, int(timeout + 0.999))
        wrapped = ["timeout", "-k", "2", str(secs), *argv]
        uid, gid = sandbox_owner()
        start = time.monotonic()
        try:
            exec_id = self.api.exec_create(
                cid, wrapped, workdir=workdir, user=f"{uid}:{gid}", environment=env or None
            )["Id"]
            stream = self.api.exec_start(exec_id, stream=True, demux=True)
            out, err = bytearray(), bytearray()
            truncated = False
            for chunk_out, chunk_err in stream:
                for buf, chunk in ((out, chunk_out), (err, chunk_err)):
                    if not chunk:
                        continue
                    room = output_limit - len(buf)
                    if room > 0:
                        buf += chunk[:room]
                    if len(chunk) > max(room, 0):
                        truncated = True  # keep draining so the command can finish
            info = self.api.exec_inspect(exec_id)
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`") from exc
        except DockerException as exc:
            raise SandboxError(f"exec failed in {cid[:12]}: {_explain(exc)}") from exc
        duration = (time.monotonic() - start) * 1000
        code = info.get("ExitCode")
        code = -1 if code is None else int(code)
        timed_out = code == 124 or (code == 137 and duration >= secs * 1000)
        result = ExecResult(
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            exit_code=code,
            duration_ms=round(duration, 2),
            truncated=truncated,
            timed_out=timed_out,
        )
        if timed_out:
            raise CommandTimeout(
                f"command timed out after {secs}s and was killed: {_short(argv)}",
                result=result.to_dict(),
            )
        return result


def _short(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 120 else text[:117] + "..."


def _explain(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return str(exc.explanation or exc)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
