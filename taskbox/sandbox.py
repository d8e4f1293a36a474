"""Task containers through the Docker Engine API: hardened defaults, exec with bounds.

Containers idle (``sleep infinity`` under an init process) and commands run in them with
``docker exec``. The default profile (SPEC §6) is:

* a non-root user (the host user's uid, or the image's ``agent`` user when taskbox is root);
* every capability dropped, ``no-new-privileges``, Docker's default seccomp profile (never
  ``unconfined`` unless asked for), never privileged, no devices, no host namespaces
  (private pid, ipc and cgroup namespaces), never the Docker socket;
* pids, memory (no swap beyond it) and CPU limits; open-files and file-size ulimits; a
  bounded container log; an init process that reaps zombies;
* no network (``none``), or an internal network behind an egress proxy (``allowlist``,
  see :mod:`taskbox.network`); the engine's bridge (``open``) only when asked for; never
  the host network;
* gVisor (``runsc``) as the runtime when the engine has it, unless told otherwise.

Anything weaker than this is listed by :func:`weakened` so adapters can warn about it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import docker
from docker.errors import APIError, ImageNotFound
from docker.errors import NotFound as DockerNotFound
from docker.types import DriverConfig, LogConfig, Mount, Ulimit

from . import engine as docker_engine
from . import execagent
from .config import parse_size
from .confine import sandbox_owner
from .engine import DOCKER_ERRORS
from .errors import (
    CommandCancelled,
    CommandTimeout,
    ImageMissing,
    InvalidInput,
    NotFound,
    SandboxError,
)
from .models import ContainerState
from .network import MODES as NETWORK_MODES
from .network import PROXY_ALIAS, PROXY_UID, EgressConfig, squid_config

LABEL_TASK = "taskbox.task"
LABEL_HOME = "taskbox.home"
LABEL_ROLE = "taskbox.role"  # "egress-proxy" on proxy containers, absent on task containers
LABEL_EGRESS_FOR = "taskbox.egress-for"  # on a proxy and a task network: the task container's name
LABEL_EGRESS = "taskbox.egress"  # on a task container: base64 JSON of its egress configuration
LABEL_PORT_FOR = "taskbox.port-for"  # on a port forwarder: the task container's name
LABEL_PORT = "taskbox.port"  # on a port forwarder: "PORT HOST_IP HOST_PORT"
LABEL_SCRATCH = "taskbox.scratch"  # on a throwaway container that reads a workspace for the host
LABEL_POOL = "taskbox.pool"  # on a warm pool slot's container: its slot id (taskbox.pool)
LABEL_POOL_PROFILE = "taskbox.pool-profile"  # on a slot's container: the key of its sandbox profile
CONTAINER_WORKSPACE = "/workspace"
MIN_MEMORY = 64 * 1024**2
MIN_CPUS = 0.1
MIN_PIDS = 16
MAX_LOG_LINE = 64 * 1024  # a proxy log line longer than this is dropped, not buffered
DEFAULT_NOFILE = 4096
DEFAULT_FSIZE = 8 * 1024**3  # one file may not grow past this (SIGXFSZ / EFBIG)
KILL_MARK = "TASKBOX_EXEC"  # every exec carries a unique value, so its processes can be found
# Marks of the agent's own commands and background jobs start with these; taskbox's own
# commands (git for the host) carry a bare hex mark, so they never count as "running work".
CMD_MARK = "cmd-"
JOB_MARK = "job-"
JOBS_DIR = "/tmp/.taskbox-jobs"  # one directory per background job, in the container
JOB_ID = re.compile(r"^j-[0-9a-f]{8}$")
JOB_OUTPUT_LIMIT = 64 * 1024**2  # a job's output file stops growing here; the job keeps running
_PROC_READ = 256 * 1024  # most bytes of a process's environ or cmdline read on the host
# Capabilities a task may ask to add back. Everything that reaches the host (SYS_ADMIN,
# SYS_PTRACE, NET_ADMIN, SYS_MODULE, DAC_READ_SEARCH …) is refused outright.
ADDABLE_CAPS = frozenset({"CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
                          "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "AUDIT_WRITE", "SETFCAP", "MKNOD"})
RUNTIMES_SAFE = ("runsc",)
# Sandbox.exec runs every command under this wrapper: ``timeout`` (its own process group,
# killed whole on expiry), then a last stdout line with the exec's nonce and exit code.
_WRAPPER_NAME = "taskbox-exec"
_END_WRAPPER = ('n=$1 s=$2; shift 2; timeout -k 2 "$s" "$@"; c=$?; '
                'printf "\\n%s %d\\n" "$n" "$c"; exit "$c"')
_END_TAIL = 128  # bytes of stdout kept to find the marker (it is about 50)

def parse_memory(value: str | int) -> int:
    """Parse ``512m``/``2g``/bytes into bytes; refuse values under the sane minimum."""
    size = parse_size(value, "memory limit")
    if size < MIN_MEMORY:
        raise InvalidInput(f"memory limit {value!r} is below the minimum of 64m")
    return size


def check_cpus(value: float) -> float:
    """Refuse a CPU limit under the sane minimum; the host's cores are checked by :func:`check_limits`."""
    if not value >= MIN_CPUS:  # also NaN
        raise InvalidInput(f"cpu limit {value} is below the minimum of {MIN_CPUS} cores")
    return value


def format_size(size: int) -> str:
    """Bytes as the shortest of ``512m`` / ``23.4g`` that reads well in an error message."""
    for unit, factor in (("t", 1024**4), ("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if size >= factor:
            return f"{size / factor:.1f}".removesuffix(".0") + unit
    return f"{size}b"


@dataclass(frozen=True)
class Capacity:
    """What the machine that runs the containers has: total memory (bytes) and CPUs."""

    memory: int | None
    cpus: float | None
    source: str  # "the host" or "the Docker engine", for error messages


def host_capacity() -> Capacity:
    """This machine's total memory (``/proc/meminfo``) and the CPUs this process may use."""
    memory = None
    try:
        with open("/proc/meminfo", "rb") as fh:
            head = fh.read(4096).decode(errors="replace")  # MemTotal is the first line
        m = re.search(r"^MemTotal:\s+(\d+)\s*kB", head, re.MULTILINE)
        memory = int(m.group(1)) * 1024 if m else None
    except OSError:
        pass
    try:
        cpus: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return Capacity(memory, float(cpus) if cpus else None, "the host")


def check_limits(memory: str, cpus: float, pids: int, *, max_memory: str = "", max_cpus: float = 0.0,
                 max_pids: int = 0, capacity: Capacity | None = None) -> int:
    """Refuse resource limits above the settings' caps or the machine's capacity; return memory in bytes.

    The error names the cap that was hit, so the user knows which one to raise (a setting)
    or that the machine cannot give more.
    """
    mem = parse_memory(memory)
    check_cpus(cpus)
    if pids < MIN_PIDS:
        raise InvalidInput(f"pids limit {pids} is below the minimum of {MIN_PIDS}")
    if max_memory and mem > parse_memory(max_memory):
        raise InvalidInput(f"memory limit {memory} exceeds the cap of {max_memory} (setting max_memory)")
    if max_cpus and cpus > max_cpus:
        raise InvalidInput(f"cpu limit {cpus:g} exceeds the cap of {max_cpus:g} cores (setting max_cpus)")
    if max_pids and pids > max_pids:
        raise InvalidInput(f"pids limit {pids} exceeds the cap of {max_pids} (setting max_pids)")
    if capacity is not None:
        if capacity.memory and mem > capacity.memory:
            raise InvalidInput(f"memory limit {memory} exceeds the {format_size(capacity.memory)} of memory "
                               f"{capacity.source} has")
        if capacity.cpus and cpus > capacity.cpus:
            raise InvalidInput(f"cpu limit {cpus:g} exceeds the {capacity.cpus:g} CPUs {capacity.source} has")
    return mem


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
    # Hardening knobs: the defaults are the safe profile; see weakened().
    runtime: str = "auto"  # "auto": runsc when the engine has it, else the engine default
    cap_add: list[str] = field(default_factory=list)
    nofile: int = DEFAULT_NOFILE
    fsize: int = DEFAULT_FSIZE
    seccomp: str = "default"  # "default" or "unconfined"
    egress: EgressConfig | None = None  # required for network "allowlist"
    # Host directories taskbox owns (shared caches, a CA bundle), mounted read-only: host path -> target.
    ro_binds: dict[str, str] = field(default_factory=dict)
    # "rslave" on a warm pool slot (taskbox.pool): a workspace bound on the slot's directory
    # later appears in the running container.
    workspace_propagation: str = ""

    def profile(self, agent: bool) -> dict[str, Any]:
        """Everything that makes two containers alike but their name, workspace and labels:
        a warm pool slot serves a task only when these are equal (``agent``: the exec agent is on)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("name", "workspace", "labels", "workspace_propagation")}
        out["exec_agent"] = agent
        return out


@dataclass
class Captured:
    """The outcome of one of taskbox's own commands in a sandbox: exit code, bounded output."""

    exit_code: int
    stdout: bytes
    stderr: str
    truncated: bool = False


@dataclass
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int
    duration_ms: float
    truncated: bool = False
    timed_out: bool = False
    oom_killed: bool = False
    cancelled: bool = False
    # The output stream ended before the command's own end (see Sandbox.exec): what came is
    # here, the rest was lost; never a clean run.
    output_incomplete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExecControl:
    """A handle on one running command, shared with other threads.

    The command's newest output is kept in a small rolling buffer (for progress reports),
    and :meth:`cancel` kills the command's processes in the container from any thread.
    """

    def __init__(self, tail_bytes: int = 8192) -> None:
        self._lock = threading.Lock()
        self._tail = bytearray()
        self._tail_bytes = tail_bytes
        self._kill: Callable[[], object] | None = None
        self.output_bytes = 0
        self.started = time.monotonic()
        self.cancelled = threading.Event()
        self.done = threading.Event()  # set by whoever runs the command, when it is over and logged
        self.redact: Callable[[str], str] = lambda text: text
        self.echo: Callable[[bytes], object] | None = None  # e.g. `taskbox run` showing output as it comes
        # Every chunk as it comes, with its stream ("stdout" or "stderr"): the live output
        # events (taskbox.live_output). Raw, wrapper marker included: the tap bounds and cleans.
        self.tap: Callable[[str, bytes], object] | None = None
        self.exec_id = secrets.token_hex(6)  # names this command's live output events

    def feed(self, chunk: bytes, stream: str = "stdout") -> None:
        with self._lock:
            self.output_bytes += len(chunk)
            self._tail += chunk
            del self._tail[:-self._tail_bytes]
        if self.echo is not None:
            self.echo(chunk)
        if self.tap is not None:
            self.tap(stream, chunk)

    def tail(self, lines: int = 10, chars: int = 2000) -> str:
        """The newest ``lines`` complete-or-partial lines of output, at most ``chars`` characters."""
        with self._lock:
            raw = bytes(self._tail)
        text = self.redact(raw.decode(errors="replace"))
        return "\n".join(text.splitlines()[-lines:])[-chars:]

    def attach(self, kill: Callable[[], object]) -> None:
        """Called by the sandbox once the command runs; a cancel that came first kills it now."""
        with self._lock:
            self._kill = kill
        if self.cancelled.is_set():
            kill()

    def cancel(self) -> None:
        """Kill the command (its whole process tree in the container); safe from any thread."""
        self.cancelled.set()
        with self._lock:
            kill = self._kill
        if kill is not None:
            kill()


# A published port is two small forwarders, so it can be added and removed while the task runs
# and works in every network mode (Docker cannot add a port to a running container, nor
# publish one from an internal network): the *inner* one shares the task container's network
# namespace and connects a Unix socket to 127.0.0.1:PORT there; the *outer* one, on the
# default bridge, publishes HOST_IP:HOST_PORT and relays each connection to that socket (a
# volume both mount). Neither gives the task a way out: they only accept inbound connections.
_FORWARD = r"""
import os, socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
path = "/run/fwd/sock"
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try: s.shutdown(socket.SHUT_RDWR)
            except OSError: pass
def serve(listener, connect):
    while True:
        conn, _ = listener.accept()
        try:
            other = connect()
        except OSError:
            conn.close(); continue
        threading.Thread(target=pump, args=(conn, other), daemon=True).start()
        threading.Thread(target=pump, args=(other, conn), daemon=True).start()
if mode == "inner":
    try: os.unlink(path)
    except FileNotFoundError: pass
    lst = socket.socket(socket.AF_UNIX); lst.bind(path); lst.listen(64)
    serve(lst, lambda: socket.create_connection(("127.0.0.1", port)))
else:
    lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", 8080)); lst.listen(64)
    def unix():
        s = socket.socket(socket.AF_UNIX); s.connect(path); return s
    serve(lst, unix)
"""


class TtySession:
    """One ``docker exec`` with a terminal: bytes both ways on one socket, a resizable window."""

    def __init__(self, api: Any, exec_id: str, sock: Any) -> None:
        self.api = api
        self.exec_id = exec_id
        self._io = sock
        self.sock = getattr(sock, "_sock", sock)  # the raw socket under docker-py's wrapper

    def resize(self, rows: int, cols: int) -> None:
        try:
            self.api.exec_resize(self.exec_id, height=rows, width=cols)
        except DOCKER_ERRORS:
            pass  # the exec ended meanwhile

    def relay(self, stdin_fd: int, stdout_fd: int, *, size: Callable[[], tuple[int, int] | None] | None = None,
              poll: float = 0.25) -> int:
        """Copy ``stdin_fd`` to the exec and its output to ``stdout_fd`` until it ends; its exit code.

        ``size`` (rows, columns) is polled and every change is sent as a window resize. A closed
        terminal (EOF or an error on ``stdin_fd``) ends the relay without ending the exec.
        """
        import select

        last: tuple[int, int] | None = None
        stdin_open = True
        while True:
            if size is not None:
                now = size()
                if now and now != last:
                    last = now
                    self.resize(*now)
            readers = [self.sock] + ([stdin_fd] if stdin_open else [])
            ready, _, _ = select.select(readers, [], [], poll)
            if self.sock in ready:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                try:
                    os.write(stdout_fd, data)
                except OSError:
                    break  # the terminal went away: the agent keeps running
            if stdin_open and stdin_fd in ready:
                try:
                    data = os.read(stdin_fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    stdin_open = False
                    break
                try:
                    self.sock.sendall(data)
                except OSError:
                    break
        return self.exit_code()

    def exit_code(self) -> int:
        try:
            self._io.close()
        except OSError:
            pass
        try:
            code = self.api.exec_inspect(self.exec_id).get("ExitCode")
        except DOCKER_ERRORS:
            return -1
        return -1 if code is None else int(code)


def weakened(spec: ContainerSpec, *, default_pids: int = 512, default_memory: str = "2g") -> list[str]:
    """Human-readable warnings for every way ``spec`` is weaker than the default profile."""
    out = []
    if spec.network == "open":
        out.append("network `open`: the task can reach any host, including this machine's services; "
                   "prefer `allowlist` with the domains it needs")
    if spec.cap_add:
        out.append(f"capabilities added back: {', '.join(sorted(spec.cap_add))}")
    if spec.seccomp != "default":
        out.append("seccomp is unconfined: every system call is allowed")
    if spec.runtime not in ("auto", *RUNTIMES_SAFE):
        out.append(f"runtime {spec.runtime!r} chosen explicitly (gVisor `runsc` is not used)")
    if spec.pids_limit > default_pids:
        out.append(f"pids limit raised to {spec.pids_limit} (default {default_pids})")
    if parse_memory(spec.memory) > parse_memory(default_memory):
        out.append(f"memory limit raised to {spec.memory} (default {default_memory})")
    if spec.nofile > DEFAULT_NOFILE:
        out.append(f"open-files limit raised to {spec.nofile} (default {DEFAULT_NOFILE})")
    if spec.fsize > DEFAULT_FSIZE:
        out.append(f"file-size limit raised to {spec.fsize} bytes (default {DEFAULT_FSIZE})")
    return out


class Sandbox:
    """Container operations for tasks; Docker errors are translated at this boundary."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client
        self.api = client.api
        self._runtimes: set[str] | None = None
        self._capacity: Capacity | None = None
        self._cgroups: dict[str, tuple[int, dict[str, Path]]] = {}
        # The in-sandbox exec agent (taskbox.execagent): set by the service to the data
        # directory; None runs every command with `docker exec`, as does a container made
        # before agents existed or from an image without python3.
        self.agent_home: Path | None = None
        self._agent_keys: execagent.KeyStore | None = None
        self.agent_wait = 5.0  # seconds a start waits for the agent's key in the container's log
        # The warm pool's release of a slot by id (taskbox.pool.Pool.release), set by the
        # service: removing a slot's container undoes its slot (its workspace bind, its directory).
        self.release_slot: Callable[[str], object] | None = None
        # The freeze gate (see ``_exec_gate``): a directory of per-container lock files, set by
        # the service; None turns it off.
        self.gate_dir: Path | None = None
        self.freeze_wait = 5.0  # seconds a pause waits for commands being started to be running
        self._frozen: dict[str, tuple[int, int]] = {}  # cid -> (gate fd, the pausing thread)
        self._gating: dict[str, int] = {}  # exec id -> gate fd, from its create to its process start

    # --- engine facts ------------------------------------------------------------------------

    def runtimes(self) -> set[str]:
        """The OCI runtimes the engine offers (``runc``, and ``runsc`` when gVisor is installed)."""
        if self._runtimes is None:
            try:
                self._runtimes = set((self.api.info().get("Runtimes") or {}).keys())
            except DOCKER_ERRORS as exc:
                raise docker_engine.translate(exc, "could not read the engine's runtimes") from exc
        return self._runtimes

    def capacity(self) -> Capacity:
        """The engine's machine: its total memory and CPUs (``docker info``), read once."""
        if self._capacity is None:
            try:
                info = self.api.info()
            except DOCKER_ERRORS as exc:
                raise docker_engine.translate(exc, "could not read the engine's capacity") from exc
            memory, ncpu = info.get("MemTotal"), info.get("NCPU")
            self._capacity = Capacity(int(memory) if memory else None, float(ncpu) if ncpu else None,
                                      "the Docker engine")
        return self._capacity

    def _runtime(self, wanted: str) -> str | None:
        if wanted == "auto":
            return next((r for r in RUNTIMES_SAFE if r in self.runtimes()), None)
        if wanted in ("", "default"):
            return None
        if wanted not in self.runtimes():
            raise InvalidInput(f"runtime {wanted!r} is not installed in the engine "
                               f"(it has: {', '.join(sorted(self.runtimes()))})")
        return wanted

    # --- create ------------------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> str:
        """Create and start a task container (and, in ``allowlist`` mode, its proxy); return its id."""
        if spec.network not in NETWORK_MODES:
            raise InvalidInput(f"network mode {spec.network!r} is not one of {', '.join(NETWORK_MODES)}")
        if spec.network == "allowlist" and spec.egress is None:
            raise InvalidInput("network mode allowlist needs egress rules")
        bad_caps = sorted({c.upper().removeprefix("CAP_") for c in spec.cap_add} - ADDABLE_CAPS)
        if bad_caps:
            raise InvalidInput(f"capabilities {', '.join(bad_caps)} cannot be given to a task container")
        if spec.seccomp not in ("default", "unconfined"):
            raise InvalidInput(f"seccomp must be `default` or `unconfined`, not {spec.seccomp!r}")
        # The engine's own capacity, checked here too: a lazy task's limits were checked only
        # against this host, and the engine may be a VM or another machine.
        mem = check_limits(spec.memory, spec.cpus, spec.pids_limit, capacity=self.capacity())
        uid, gid = sandbox_owner()
        runtime = self._runtime(spec.runtime)
        env = {"HOME": "/home/agent", **spec.env}
        labels = dict(spec.labels)
        network_mode = "none"
        extra: dict[str, Any] = {}
        if spec.network == "allowlist":
            assert spec.egress is not None
            network_mode = self._create_egress(spec)
            env.update(spec.egress.proxy_env())
            labels[LABEL_EGRESS] = _encode_egress(spec.egress)
            # Names resolve through Docker's embedded DNS, which forwards unknown names to
            # 127.0.0.1 *inside* the task's namespace, where nothing listens: the proxy's
            # name resolves, nothing else does, and no query leaves the machine.
            extra.update(dns=["127.0.0.1"], sysctls={"net.ipv6.conf.all.disable_ipv6": "1"})
        elif spec.network == "open":
            network_mode = "bridge"
        security_opt = ["no-new-privileges:true"]
        if spec.seccomp == "unconfined":
            security_opt.append("seccomp=unconfined")
        mode = "rw,rslave" if spec.workspace_propagation == "rslave" else "rw"
        binds = {str(spec.workspace): {"bind": CONTAINER_WORKSPACE, "mode": mode}}
        for source, target in spec.ro_binds.items():
            binds[source] = {"bind": target, "mode": "ro"}
        command = ["sleep", "infinity"]
        if self.agent_home is not None:
            # The exec agent: its script read-only from the host, its socket in a small tmpfs
            # volume of its own (the engine removes it with the container).
            binds[str(execagent.install(self.agent_home))] = {"bind": execagent.MOUNT_AGENT, "mode": "ro"}
            extra["mounts"] = [Mount(target=execagent.MOUNT_RUN, source=None, type="volume",
                                     driver_config=DriverConfig("local", {
                                         "type": "tmpfs", "device": "tmpfs",
                                         "o": f"{execagent.RUN_TMPFS},uid={uid}"}))]
            command = execagent.launch_command()
        host_config = self.api.create_host_config(
            binds=binds,
            network_mode=network_mode,
            cap_drop=["ALL"],
            cap_add=sorted({c.upper().removeprefix("CAP_") for c in spec.cap_add}) or None,
            security_opt=security_opt,
            pids_limit=spec.pids_limit,
            mem_limit=mem,
            memswap_limit=mem,  # no swap beyond the memory limit
            nano_cpus=int(spec.cpus * 1e9),
            init=True,
            privileged=False,
            ipc_mode="private",
            pid_mode=None,
            cgroupns="private",
            devices=[],
            runtime=runtime,
            ulimits=[Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
                     Ulimit(name="fsize", soft=spec.fsize, hard=spec.fsize)],
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"}),
            **extra,
        )
        try:
            created = self.api.create_container(
                spec.image,
                command=command,
                name=spec.name,
                user=f"{uid}:{gid}",
                working_dir=CONTAINER_WORKSPACE,
                environment=env,
                labels=labels,
                host_config=host_config,
                network_disabled=spec.network == "none",
            )
            cid: str = created["Id"]
            self.api.start(cid)
        except ImageNotFound as exc:
            self._remove_egress(spec.name)
            raise ImageMissing(
                f"sandbox image {spec.image} is not built; run `taskbox image build`"
            ) from exc
        except DOCKER_ERRORS as exc:
            self._remove_egress(spec.name)
            raise docker_engine.translate(exc, f"could not create container {spec.name}") from exc
        self.learn_agent(cid)
        return cid

    def _create_egress(self, spec: ContainerSpec) -> str:
        """Make the task's internal network and its proxy container; return the network name."""
        assert spec.egress is not None
        egress = spec.egress
        net_name = f"{spec.name}-net"
        self._remove_egress(spec.name)  # leftovers of a crashed create hold the names
        home = spec.labels.get(LABEL_HOME, "")
        labels = {LABEL_HOME: home, LABEL_EGRESS_FOR: spec.name, **egress.extra_labels}
        if LABEL_TASK in spec.labels:
            labels[LABEL_TASK] = spec.labels[LABEL_TASK]
        try:
            self.ensure_outside_network(egress.outside_network)
            # internal: no route out. inhibit_ipv4: the host's end of the bridge gets no
            # address, so the host's own services are unreachable too.
            self.api.create_network(net_name, driver="bridge", internal=True, labels=labels,
                                    options={"com.docker.network.bridge.inhibit_ipv4": "true"},
                                    check_duplicate=True)
            host_config = self.api.create_host_config(
                network_mode=egress.outside_network,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                read_only=True,
                tmpfs={"/tmp": "size=16m,mode=1777"},
                pids_limit=64,
                mem_limit=128 * 1024**2,
                memswap_limit=128 * 1024**2,
                nano_cpus=int(0.5e9),
                init=True,
                ipc_mode="private",
                log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
            )
            proxy = self.api.create_container(
                egress.image, name=f"{spec.name}-egress", user=PROXY_UID,
                environment={"TASKBOX_SQUID_CONF": squid_config(egress.rules)},
                labels={**labels, LABEL_ROLE: "egress-proxy"}, host_config=host_config,
            )["Id"]
            self.api.connect_container_to_network(proxy, net_name, aliases=[PROXY_ALIAS])
            self.api.start(proxy)
        except ImageNotFound as exc:
            self._remove_egress(spec.name)
            raise ImageMissing(f"egress proxy image {egress.image} is not built; "
                               "run `taskbox image build --proxy`") from exc
        except DOCKER_ERRORS as exc:
            self._remove_egress(spec.name)
            raise docker_engine.translate(exc, f"could not set up the egress proxy of {spec.name}") from exc
        self._wait_proxy(proxy)
        return net_name

    def _wait_proxy(self, proxy: str, timeout: float = 20) -> None:
        """Wait until squid accepts connections, so the task's first request does not fail."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                logs = self.api.logs(proxy, stdout=False, stderr=True, tail=200).decode(errors="replace")
                state = self.api.inspect_container(proxy)["State"]
            except DOCKER_ERRORS as exc:
                raise docker_engine.translate(exc, f"egress proxy {proxy[:12]} failed") from exc
            if "Accepting HTTP Socket connections" in logs:
                return
            if not state.get("Running") or time.monotonic() > deadline:
                tail = "\n".join(logs.splitlines()[-5:])
                raise SandboxError(f"egress proxy {proxy[:12]} did not start:\n{tail}")
            time.sleep(0.05)

    def ensure_outside_network(self, name: str) -> None:
        """Create the proxies' shared outside network unless it exists (an existing one is used as is)."""
        try:
            if any(n["Name"] == name for n in self.api.networks(names=[name])):
                return
            self.api.create_network(name, driver="bridge", labels={LABEL_ROLE: "egress-outside"},
                                    check_duplicate=True)
        except APIError as exc:
            if exc.status_code == 409:  # created concurrently
                return
            raise

    def _egress_of(self, cid: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The name of a task container and its egress proxy containers (none outside allowlist)."""
        try:
            info = self.api.inspect_container(cid)
        except DockerNotFound:
            return None, []
        labels = info["Config"].get("Labels") or {}
        if labels.get(LABEL_ROLE) == "egress-proxy":
            return None, []
        name = info["Name"].lstrip("/")
        if LABEL_EGRESS not in labels:
            return name, []
        return name, list(self.api.containers(all=True, filters={"label": f"{LABEL_EGRESS_FOR}={name}"}))

    def _remove_egress(self, name: str) -> None:
        try:
            for c in self.api.containers(all=True, filters={"label": f"{LABEL_EGRESS_FOR}={name}"}):
                self.api.remove_container(c["Id"], force=True, v=True)
            for n in self.api.networks(filters={"label": f"{LABEL_EGRESS_FOR}={name}"}):
                try:
                    self.api.remove_network(n["Id"])
                except APIError as exc:
                    if exc.status_code not in (403, 404, 409):  # still in use, or gone
                        raise
        except DockerNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not remove the egress proxy of {name}") from exc

    def egress_log(self, cid: str, since: str | None = None,
                   max_lines: int = 10_000) -> list[tuple[str, str]]:
        """New lines of a task's proxy access log as ``(docker timestamp, line)``, after ``since``.

        Read as a stream and stopped after ``max_lines`` lines (over-long lines are dropped),
        so a flood of requests never makes one read unbounded.
        """
        name, proxies = self._egress_of(cid)
        out: list[tuple[str, str]] = []
        for p in proxies:
            kwargs: dict[str, Any] = {"stdout": True, "stderr": False, "timestamps": True, "stream": True,
                                      "follow": False}
            if since:
                kwargs["since"] = _docker_time(since)
            try:
                stream = self.api.logs(p["Id"], **kwargs)
                try:
                    buf = b""
                    for chunk in stream:
                        buf += chunk
                        *complete, buf = buf.split(b"\n")
                        for raw in complete:
                            stamp, _, text = raw.decode(errors="replace").partition(" ")
                            if stamp and not (since and stamp <= since):
                                out.append((stamp, text))
                        if len(buf) > MAX_LOG_LINE:
                            buf = b""
                        if len(out) >= max_lines:
                            break
                    else:
                        stamp, _, text = buf.decode(errors="replace").partition(" ")
                        if stamp and not (since and stamp <= since):
                            out.append((stamp, text))
                finally:
                    stream.close()
            except DOCKER_ERRORS as exc:
                raise docker_engine.translate(exc, f"could not read the egress log of {name}") from exc
            if len(out) >= max_lines:
                return out[:max_lines]
        return out

    def ensure_image(self, image: str, build: str = "taskbox image build") -> None:
        """Raise :class:`ImageMissing` (saying to run ``build``) unless ``image`` exists."""
        from . import images

        images.ensure(self.client, image, build)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, cid: str) -> None:
        try:
            name, proxies = self._egress_of(cid)
            info = self.api.inspect_container(cid)
            labels = info["Config"].get("Labels") or {}
            if name and LABEL_EGRESS in labels and not proxies:
                self._recreate_egress(name, info)  # lost (e.g. removed by hand): make it again
            for p in proxies:
                self.api.start(p["Id"])
            self.api.start(cid)
            for p in proxies:
                self._wait_proxy(p["Id"])
            if name:
                self._restart_forwarders(name)
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not start container {cid[:12]}") from exc
        self.learn_agent(cid)

    # --- the exec agent (taskbox.execagent) ----------------------------------------------------

    @property
    def agent_keys(self) -> execagent.KeyStore | None:
        if self.agent_home is None:
            return None
        if self._agent_keys is None:
            self._agent_keys = execagent.KeyStore(self.agent_home / "exec-agent" / "keys")
        return self._agent_keys

    def learn_agent(self, cid: str) -> bool:
        """Read the key of a container's exec agent from the first line of its log since it
        started; called right after taskbox starts a container, before any of the sandbox's
        commands can run (so that line can only be the agent's). False when it has no agent."""
        keys = self.agent_keys
        if keys is None:
            return False
        keys.drop(cid)
        try:
            info = self.api.inspect_container(cid)
        except DOCKER_ERRORS:
            return False
        run_dir = next((m.get("Source") for m in info.get("Mounts") or []
                        if m.get("Destination") == execagent.MOUNT_RUN), None)
        started = (info.get("State") or {}).get("StartedAt") or ""
        if not run_dir or not started:
            return False
        deadline = time.monotonic() + self.agent_wait
        while True:
            try:
                log = self.api.logs(cid, stdout=True, stderr=False, since=_docker_time(started))
            except DOCKER_ERRORS:
                return False
            found = execagent.read_key(log[:4096])
            if isinstance(found, bytes):
                keys.save(cid, run_dir, found)
                return True
            if found is False or time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def _recreate_egress(self, name: str, info: dict[str, Any]) -> None:
        labels = info["Config"].get("Labels") or {}
        egress = _decode_egress(labels[LABEL_EGRESS])
        spec = ContainerSpec(name=name, image="", workspace=Path("/"), labels=labels, network="allowlist",
                             egress=egress)
        net = self._create_egress(spec)
        # The task container still points at its (removed) old network: reattach it.
        try:
            self.api.connect_container_to_network(info["Id"], net)
        except APIError:
            pass

    def stop(self, cid: str, timeout: int = 2) -> None:
        try:
            name, proxies = self._egress_of(cid)
            self.api.stop(cid, timeout=timeout)
            for p in proxies:
                self.api.stop(p["Id"], timeout=1)
            for f in self.api.containers(filters={"label": f"{LABEL_PORT_FOR}={name}"}) if name else []:
                self.api.stop(f["Id"], timeout=1)
        except DockerNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not stop container {cid[:12]}") from exc

    def remove(self, cid: str) -> None:
        if not cid:
            return
        try:
            info = self.api.inspect_container(cid)
        except DockerNotFound:
            return
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect container {cid[:12]}") from exc
        labels = info["Config"].get("Labels") or {}
        owner = labels.get(LABEL_EGRESS_FOR) or info["Name"].lstrip("/")
        try:
            self.api.remove_container(cid, force=True, v=True)
        except DockerNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not remove container {cid[:12]}") from exc
        self._cgroups.pop(cid, None)
        if self.agent_keys is not None:
            self.agent_keys.drop(cid)
        if self.gate_dir is not None and re.fullmatch(r"[0-9a-f]{12,64}", info["Id"]):
            try:
                os.unlink(self.gate_dir / f"freeze-{info['Id'][:12]}.lock")
            except OSError:
                pass  # never made (no exec, no pause)
        if LABEL_EGRESS in labels or labels.get(LABEL_ROLE) == "egress-proxy":
            self._remove_egress(owner)
        if not labels.get(LABEL_ROLE):
            self._remove_forwarders(owner)
        if labels.get(LABEL_POOL) and self.release_slot is not None:
            self.release_slot(labels[LABEL_POOL])

    def pool_containers(self, home_label: str) -> list[dict[str, Any]]:
        """The warm pool slots' containers of this taskbox home (running or not)."""
        try:
            return list(self.api.containers(all=True, filters={"label": [f"{LABEL_HOME}={home_label}",
                                                                         LABEL_POOL]}))
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, "could not list the pool's containers") from exc

    def container_info(self, cid: str) -> dict[str, Any] | None:
        """Whether a container runs and its image id; None when it is gone."""
        if not cid:
            return None
        try:
            info = self.api.inspect_container(cid)
        except DockerNotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect container {cid[:12]}") from exc
        return {"running": bool((info.get("State") or {}).get("Running")), "image": info.get("Image")}

    def image_id(self, image: str) -> str | None:
        """The id of a local image (None when it is not there)."""
        try:
            return str(self.api.inspect_image(image)["Id"])
        except DockerNotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect image {image}") from exc

    def state(self, cid: str | None) -> ContainerState:
        if not cid:
            return ContainerState.NONE
        try:
            info = self.api.inspect_container(cid)
        except DockerNotFound:
            return ContainerState.LOST
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect container {cid[:12]}") from exc
        st = info["State"]
        if st.get("OOMKilled") and not st.get("Running"):
            return ContainerState.OOM_KILLED
        return ContainerState.RUNNING if st.get("Running") else ContainerState.STOPPED

    def task_containers(self, home_label: str) -> list[dict[str, Any]]:
        """Every container (running or not) labelled as belonging to this taskbox home."""
        try:
            return list(self.api.containers(all=True, filters={"label": f"{LABEL_HOME}={home_label}"}))
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, "could not list containers") from exc

    # --- freezing, and container images (checkpoints) --------------------------------------

    def container_state(self, cid: str) -> dict[str, Any] | None:
        """The engine's ``State`` of a container (``Running``, ``Paused`` …); None if it is gone."""
        try:
            return dict(self.api.inspect_container(cid)["State"])
        except DockerNotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect container {cid[:12]}") from exc

    # --- the freeze gate ------------------------------------------------------------------
    # A `docker exec` whose `runc init` is caught by a pause is frozen inside the container's
    # cgroup while the engine holds the container's lock: `unpause`, `inspect` and `rm` of that
    # container then hang. So starting an exec holds a shared lock on the container's gate file
    # until its process runs, and a pause holds the exclusive lock until the unpause: no process
    # (this one or another taskbox process) starts an exec across a freeze. The gate file's
    # name comes from the engine's container id, never from anything in the sandbox.

    def _gate_open(self, cid: str) -> int | None:
        if self.gate_dir is None or not re.fullmatch(r"[0-9a-f]{12,64}", cid):
            return None
        try:
            self.gate_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.gate_dir / f"freeze-{cid[:12]}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None

    @staticmethod
    def _gate_lock(fd: int, kind: int, wait: float) -> bool:
        deadline = time.monotonic() + wait
        pause = 0.002
        while True:
            try:
                fcntl.flock(fd, kind | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def _gate_shared(self, cid: str) -> int | None:
        """The gate's shared lock (execs do not wait for each other), or None when not gated."""
        held = self._frozen.get(cid)
        if held and held[1] == threading.get_ident():
            return None  # this thread froze it: the engine says it is paused, as before the gate
        fd = self._gate_open(cid)
        # A freeze lasts as long as a checkpoint's capture; past this an exec goes ahead (and
        # the engine says the container is paused).
        if fd is not None:
            self._gate_lock(fd, fcntl.LOCK_SH, 600.0)
        return fd

    def _exec_create(self, cid: str, argv: list[str], **options: Any) -> str:
        """``exec_create`` behind the freeze gate, which stays held until ``_exec_start`` has
        the process running."""
        fd = self._gate_shared(cid)
        try:
            exec_id = str(self.api.exec_create(cid, argv, **options)["Id"])
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self._gating[exec_id] = fd
        return exec_id

    def _exec_started(self, exec_id: str, wait: float = 5.0) -> None:
        """Return once the exec's process runs (or has ended): its ``runc init`` is done."""
        deadline = time.monotonic() + wait
        pause = 0.002
        while time.monotonic() < deadline:
            info = self.api.exec_inspect(exec_id)
            if info.get("Pid") or info.get("ExitCode") is not None or not info.get("Running", True):
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _exec_start(self, exec_id: str, **options: Any) -> Any:
        """``exec_start``; the freeze gate taken by ``_exec_create`` is let go once the process runs."""
        try:
            out = self.api.exec_start(exec_id, **options)
            if exec_id in self._gating and (options.get("stream") or options.get("socket")
                                            or options.get("detach")):
                self._exec_started(exec_id)
            return out
        finally:
            fd = self._gating.pop(exec_id, None)
            if fd is not None:
                os.close(fd)

    def pause(self, cid: str) -> None:
        """Freeze every process of a container (the cgroup freezer), once no exec is being started.

        Refused (a :class:`SandboxError`) when execs keep starting for ``freeze_wait`` seconds.
        """
        fd = self._gate_open(cid)
        if fd is not None and not self._gate_lock(fd, fcntl.LOCK_EX, self.freeze_wait):
            os.close(fd)
            raise SandboxError(f"could not pause container {cid[:12]}: commands kept starting in it")
        try:
            self.api.pause(cid)
        except DOCKER_ERRORS as exc:
            if fd is not None:
                os.close(fd)
            raise docker_engine.translate(exc, f"could not pause container {cid[:12]}") from exc
        if fd is not None:
            self._frozen[cid] = (fd, threading.get_ident())

    def unpause(self, cid: str) -> None:
        try:
            self.api.unpause(cid)
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not unpause container {cid[:12]}") from exc
        finally:
            held = self._frozen.pop(cid, None)
            if held is not None:
                os.close(held[0])

    def commit(self, cid: str, repository: str, tag: str, message: str) -> str:
        """Save a container's filesystem as the image ``repository:tag`` (without pausing it again)."""
        try:
            self.api.commit(cid, repository=repository, tag=tag, pause=False, message=message)
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not save the filesystem of container {cid[:12]}") from exc
        return f"{repository}:{tag}"

    def image_exists(self, image: str) -> bool:
        try:
            self.api.inspect_image(image)
        except DockerNotFound:
            return False
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not look up image {image}") from exc
        return True

    def remove_image(self, image: str) -> bool:
        """Remove an image; False if it is gone already or still used by a container."""
        try:
            self.api.remove_image(image)
        except DockerNotFound:
            return False
        except APIError as exc:
            if exc.status_code == 409:  # in use: a later gc tries again
                return False
            raise docker_engine.translate(exc, f"could not remove image {image}") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not remove image {image}") from exc
        return True

    def image_tags(self, repository: str) -> list[str]:
        """Every ``repository:tag`` the engine holds of ``repository``."""
        try:
            images = self.api.images(name=repository)
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not list the images of {repository}") from exc
        return [tag for img in images for tag in img.get("RepoTags") or []]

    def memory_usage(self, cid: str, *, engine: bool = True) -> dict[str, int] | None:
        """Current memory use and limit of a running container, and its process count.

        ``usage`` excludes reclaimable page cache (as ``docker stats`` shows it). Read from
        the container's cgroup on the host when possible (microseconds); otherwise from the
        engine's stats API (about a second) unless ``engine=False``. None when it does not run.
        """
        paths = self._cgroup(cid)
        mem = paths.get("memory")
        if mem is not None:
            try:
                return _cgroup_memory(mem, paths.get("pids"))
            except (OSError, ValueError):
                self._cgroups.pop(cid, None)
        if not engine:
            return None
        try:
            stats = self.api.stats(cid, stream=False, one_shot=True)
        except DockerNotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not read the stats of {cid[:12]}") from exc
        data = stats.get("memory_stats") or {}
        if "usage" not in data:
            return None
        detail = data.get("stats") or {}
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
        return {"usage": max(0, int(data["usage"]) - int(cache)), "limit": int(data.get("limit") or 0),
                "pids": int((stats.get("pids_stats") or {}).get("current") or 0)}

    def cpu_seconds(self, cid: str) -> float | None:
        """CPU time the container's processes used so far, in seconds, read from its cgroup on
        this host (cgroup v2 ``cpu.stat``, v1 ``cpuacct.usage``); None where it is not readable."""
        d = self._cgroup(cid).get("cpu")
        if d is None:
            return None
        try:
            if (d / "cpu.stat").exists() and not (d / "cpuacct.usage").exists():
                for line in (d / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) / 1e6
                return None
            return int((d / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            self._cgroups.pop(cid, None)
            return None

    # --- OOM detection -----------------------------------------------------------------------

    def oom_kills(self, cid: str) -> int | None:
        """How many processes the kernel's OOM killer has killed in the container's cgroup.

        Read on the host from the container's memory cgroup (v1 ``memory.oom_control``, v2
        ``memory.events``); None where the engine is not local or the file is not readable.
        """
        mem = self._cgroup(cid).get("memory")
        if mem is None:
            return None
        name = "memory.oom_control" if (mem / "memory.oom_control").exists() else "memory.events"
        try:
            text = (mem / name).read_text()
        except OSError:
            self._cgroups.pop(cid, None)
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def _cgroup(self, cid: str) -> dict[str, Path]:
        """The container's cgroup directories on this host (``memory``, ``pids``), if readable.

        Found once per container: the directory lasts as long as the container (restarts
        included), and a failed read drops the cached entry, so this costs no Docker call
        on the exec path.
        """
        cached = self._cgroups.get(cid)
        if cached:
            return cached[1]
        try:
            pid = int(self.api.inspect_container(cid)["State"].get("Pid") or 0)
        except DOCKER_ERRORS:
            return {}
        found: dict[str, Path] = {}
        try:
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if pid else []:
                hid, controllers, rel = line.split(":", 2)
                if hid == "0" and controllers == "":  # cgroup v2: one unified directory
                    d = Path("/sys/fs/cgroup") / rel.lstrip("/")
                    if (d / "memory.current").exists():
                        found.setdefault("memory", d)
                        found.setdefault("pids", d)
                        found.setdefault("cpu", d)
                    continue
                for ctl in ("memory", "pids", "cpuacct"):
                    if ctl in controllers.split(","):
                        d = Path("/sys/fs/cgroup") / ctl / rel.lstrip("/")
                        if d.is_dir():
                            found["cpu" if ctl == "cpuacct" else ctl] = d
        except (OSError, ValueError):
            found = {}
        if pid:
            self._cgroups[cid] = (pid, found)
        return found

    def _oom_kills_inside(self, cid: str) -> int | None:
        """The OOM kill counter read from inside the container (when the host cannot read it)."""
        try:
            exec_id = self._exec_create(cid, ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.oom_control "
                                                 "/sys/fs/cgroup/memory.events 2>/dev/null"])
            text = self._exec_start(exec_id).decode(errors="replace")
        except DOCKER_ERRORS:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return None

    # --- exec --------------------------------------------------------------------------------

    def exec(
        self,
        cid: str,
        command: str | list[str],
        *,
        workdir: str = CONTAINER_WORKSPACE,
        timeout: float = 600,
        output_limit: int = 1_000_000,
        env: dict[str, str] | None = None,
        control: ExecControl | None = None,
        owner: str | None = None,
    ) -> ExecResult:
        """Run ``command`` (a shell string or argv) in the container, bounded in time and output.

        The command runs under coreutils ``timeout`` in its own process group, so on expiry
        the whole group — background children included — is killed; processes that left the
        group (``setsid``) are found by the exec's ``TASKBOX_EXEC`` mark and killed too. An
        OOM kill during the command sets ``oom_killed`` and says so on stderr.
        ``control`` streams the output to another thread and lets it cancel the command
        (:class:`CommandCancelled`, with the partial output). ``owner`` (a lease holder's
        token, see :mod:`taskbox.liveness`) goes into the command's mark, so the commands of
        a server that died can be found and killed.
        """
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv:
            raise InvalidInput("empty command")
        secs = max(1, int(timeout + 0.999))
        # The end of the output is marked: a wrapper prints a line with a per-exec nonce and
        # the exit code after the command, so a stream the engine cut short (the exec-output
        # race: exit 0 and no output under load) is told from a command that printed nothing,
        # without another round trip to the engine.
        nonce = f"__taskbox_end_{secrets.token_hex(8)}__"
        wrapped = ["sh", "-c", _END_WRAPPER, _WRAPPER_NAME, nonce, str(secs), *argv]
        mark = CMD_MARK + (f"{owner}-" if owner else "") + secrets.token_hex(8)
        oom_before = self.oom_kills(cid)
        host_oom = oom_before is not None
        if not host_oom:
            oom_before = self._oom_kills_inside(cid)
        start = time.monotonic()
        out, err = bytearray(), bytearray()
        end = bytearray()  # the last bytes of stdout, where the end marker is
        counts = {"out": 0, "err_truncated": 0}

        def consume(chunk_out: bytes | None, chunk_err: bytes | None) -> None:
            if chunk_out:
                counts["out"] += len(chunk_out)
                end.extend(chunk_out)
                del end[:-_END_TAIL]
            for buf, chunk in ((out, chunk_out), (err, chunk_err)):
                if not chunk:
                    continue
                if control is not None:
                    control.feed(chunk, "stdout" if buf is out else "stderr")
                room = output_limit - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if buf is err and len(chunk) > max(room, 0):
                    counts["err_truncated"] = 1  # keep draining so the command can finish

        code: int | None = None
        broken = ""
        agent = self.agent_keys.load(cid) if self.agent_keys is not None else None
        if agent is not None:
            # The agent's answers are checked, bounded and timed by the host (taskbox.execagent);
            # the host's deadline is past the wrapper's own timeout and its kill grace.
            if control is not None:
                control.attach(lambda: self.kill_marked(cid, mark))
            try:
                code = execagent.run(agent[0], agent[1], wrapped, cwd=workdir,
                                     env={**(env or {}), KILL_MARK: mark}, deadline=start + secs + 10,
                                     on_output=lambda kind, data: consume(data, None) if kind == b"O"
                                     else consume(None, data))
            except execagent.AgentUnavailable:
                agent = None  # nothing ran: docker exec runs it
            except execagent.AgentBroken as exc:
                broken = str(exc)
                self.kill_marked(cid, mark)  # whatever the command left running
        if agent is None:
            code = self._docker_exec(cid, wrapped, workdir, {**(env or {}), KILL_MARK: mark}, consume,
                                     control, mark)
        duration = (time.monotonic() - start) * 1000
        code = -1 if code is None else int(code)
        own_total = counts["out"]
        err_truncated = bool(counts["err_truncated"])
        marker = end_marker(bytes(end), nonce)
        incomplete = marker is None
        own = own_total  # bytes of stdout that are the command's own
        if marker is not None:
            size, code = marker
            own -= size
            del out[own:]
        truncated = own > output_limit or err_truncated
        cancelled = control is not None and control.cancelled.is_set()
        timed_out = not cancelled and (code == 124 or (code == 137 and duration >= secs * 1000)
                                       or (bool(broken) and duration >= (secs + 10) * 1000))
        oom_after = self.oom_kills(cid) if host_oom else self._oom_kills_inside(cid)
        oom_killed = oom_before is not None and oom_after is not None and oom_after > oom_before
        if not oom_killed and code == 137 and not timed_out and oom_before is None:
            # No counter to compare: the container's own flag is the best evidence left.
            oom_killed = self._container_oom_flag(cid)
        stderr = err.decode(errors="replace")
        if oom_killed:
            timed_out = False
            stderr += ("\n[taskbox] the command was killed by the out-of-memory killer: it reached the "
                       "task's memory limit\n")
        # Killed on purpose (cancelled, timed out, out of memory), the wrapper may die before
        # its marker: that is said already. Otherwise a missing marker is a cut stream.
        incomplete = incomplete and not (cancelled or timed_out or oom_killed)
        if incomplete and broken:
            stderr += (f"\n[taskbox] {broken}: the command's output may be incomplete and its exit code "
                       "unknown; its processes were killed\n")
        elif incomplete:
            stderr += ("\n[taskbox] the command's output stream ended before the command did (the engine "
                       "cut it short, or the command killed taskbox's wrapper): its output may be incomplete "
                       "and its exit code unknown\n")
        result = ExecResult(
            stdout=out.decode(errors="replace"),
            stderr=stderr,
            exit_code=code,
            duration_ms=round(duration, 2),
            truncated=truncated,
            timed_out=timed_out,
            oom_killed=oom_killed,
            cancelled=cancelled,
            output_incomplete=incomplete,
        )
        if cancelled:
            self.kill_marked(cid, mark)  # anything forked while the first sweep ran
            raise CommandCancelled(f"command cancelled after {duration / 1000:.1f}s and killed: {_short(argv)}",
                                   result=result.to_dict())
        if timed_out:
            self.kill_marked(cid, mark)
            raise CommandTimeout(
                f"command timed out after {secs}s and was killed: {_short(argv)}",
                result=result.to_dict(),
            )
        return result

    def _docker_exec(self, cid: str, wrapped: list[str], workdir: str, env: dict[str, str],
                     consume: Callable[[bytes | None, bytes | None], None], control: ExecControl | None,
                     mark: str) -> int | None:
        """Run the wrapped command with ``docker exec``; its output goes to ``consume``."""
        uid, gid = sandbox_owner()
        try:
            exec_id = self._exec_create(cid, wrapped, workdir=workdir, user=f"{uid}:{gid}",
                                           environment=env)
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`",
                               container_down="gone") from exc
        except APIError as exc:
            if exc.status_code == 409:  # "is not running" / "is paused" / "is restarting": nothing ran
                raise SandboxError(f"exec failed in {cid[:12]}: {exc.explanation or exc}",
                                   container_down="stopped") from exc
            raise docker_engine.translate(exc, f"exec failed in {cid[:12]}") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"exec failed in {cid[:12]}") from exc
        try:
            stream = self._exec_start(exec_id, stream=True, demux=True)
            if control is not None:
                control.attach(lambda: self.kill_marked(cid, mark))
            for chunk_out, chunk_err in stream:
                consume(chunk_out, chunk_err)
            info = self.api.exec_inspect(exec_id)
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"exec failed in {cid[:12]}") from exc
        code = info.get("ExitCode")
        return None if code is None else int(code)

    def exec_tty(self, cid: str, argv: list[str], *, workdir: str = CONTAINER_WORKSPACE,
                 env: dict[str, str] | None = None, mark: str | None = None,
                 size: tuple[int, int] | None = None) -> TtySession:
        """Start ``argv`` in the container with a terminal attached; the caller relays the bytes.

        ``mark`` is the ``TASKBOX_EXEC`` value its processes carry (so pause finds it running).
        """
        uid, gid = sandbox_owner()
        environment = {"TERM": os.environ.get("TERM") or "xterm-256color", **(env or {})}
        if mark:
            environment[KILL_MARK] = mark
        try:
            exec_id = self._exec_create(cid, argv, workdir=workdir, user=f"{uid}:{gid}", environment=environment,
                                           tty=True, stdin=True)
            sock = self._exec_start(exec_id, tty=True, socket=True)
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not start a terminal in {cid[:12]}") from exc
        session = TtySession(self.api, exec_id, sock)
        if size:
            session.resize(*size)
        return session

    def forwarders(self, cid: str) -> list[dict[str, Any]]:
        """The ports published for a task container: ``port``, ``host_ip``, ``host_port``, ``running``."""
        name = self._name(cid)
        if name is None:
            return []
        out: dict[int, dict[str, Any]] = {}
        try:
            found = self.api.containers(all=True, filters={"label": f"{LABEL_PORT_FOR}={name}"})
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, "could not list the published ports") from exc
        for c in found:
            port, host_ip, host_port = (c["Labels"].get(LABEL_PORT) or "0 - 0").split()
            row = out.setdefault(int(port), {"port": int(port), "host_ip": host_ip, "host_port": int(host_port),
                                             "running": True})
            row["running"] = row["running"] and c.get("State") == "running"
        return [out[k] for k in sorted(out)]

    def publish(self, cid: str, port: int, host_ip: str, host_port: int, image: str, labels: dict[str, str]) -> None:
        """Publish the task's ``port`` on ``host_ip:host_port`` through the two forwarders."""
        name = self._name(cid)
        if name is None:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`")
        base = f"{name}-port-{port}"
        tags = {**labels, LABEL_ROLE: "port-forward", LABEL_PORT_FOR: name, LABEL_PORT: f"{port} {host_ip} {host_port}"}
        hardening: dict[str, Any] = dict(cap_drop=["ALL"], security_opt=["no-new-privileges:true"], read_only=True,
                                         pids_limit=64, mem_limit=64 * 1024**2, memswap_limit=64 * 1024**2,
                                         nano_cpus=int(0.25e9), init=True, ipc_mode="private",
                                         log_config=LogConfig(type="json-file", config={"max-size": "1m"}))
        self.unpublish(cid, port)
        try:
            self.api.create_volume(base, labels={**labels, LABEL_PORT_FOR: name})
            mount = {base: {"bind": "/run/fwd", "mode": "rw"}}
            inner = self.api.create_container(
                image, ["python3", "-c", _FORWARD, "inner", str(port)], name=f"{base}-in", user="0:0",
                labels=tags, host_config=self.api.create_host_config(
                    network_mode=f"container:{cid}", binds=mount,
                    **{**hardening, "cap_drop": ["ALL"]}))["Id"]
            # Both run as root without any capability: the volume is root's, and the outer one
            # listens on 8080 inside (no CAP_NET_BIND_SERVICE needed), published as HOST_PORT.
            outer = self.api.create_container(
                image, ["python3", "-c", _FORWARD, "outer", str(port)], name=f"{base}-out", user="0:0",
                labels=tags, ports=[8080], host_config=self.api.create_host_config(
                    network_mode="bridge", binds=mount, port_bindings={8080: (host_ip, host_port)},
                    **hardening))["Id"]
            self.api.start(inner)
            self.api.start(outer)
        except DOCKER_ERRORS as exc:
            self.unpublish(cid, port)
            text = str(exc)
            if "already allocated" in text or "address already in use" in text:
                raise InvalidInput(f"host port {host_ip}:{host_port} is already in use; choose another with "
                                   f"HOST_PORT:{port}", port=port, host_port=host_port) from exc
            raise docker_engine.translate(exc, f"could not publish port {port} of {name}") from exc

    def unpublish(self, cid: str, port: int | None = None) -> int:
        """Remove the forwarders of ``port`` (every port if None); how many ports were removed."""
        name = self._name(cid)
        if name is None:
            return 0
        return self._remove_forwarders(name, port)

    def _remove_forwarders(self, name: str, port: int | None = None) -> int:
        removed: set[str] = set()
        try:
            for c in self.api.containers(all=True, filters={"label": f"{LABEL_PORT_FOR}={name}"}):
                if port is None or (c["Labels"].get(LABEL_PORT) or "").split()[:1] == [str(port)]:
                    self.api.remove_container(c["Id"], force=True)
                    removed.add((c["Labels"].get(LABEL_PORT) or "").split()[0])
            for v in (self.api.volumes(filters={"label": f"{LABEL_PORT_FOR}={name}"}).get("Volumes") or []):
                if port is None or v["Name"] == f"{name}-port-{port}":
                    try:
                        self.api.remove_volume(v["Name"], force=True)
                    except APIError:
                        pass
        except DockerNotFound:
            pass
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not remove the port forwarders of {name}") from exc
        return len(removed)

    def _restart_forwarders(self, name: str) -> None:
        """After the task container (re)starts: the inner forwarders join its new network namespace."""
        for c in self.api.containers(all=True, filters={"label": f"{LABEL_PORT_FOR}={name}"}):
            self.api.restart(c["Id"], timeout=1)

    def _name(self, cid: str) -> str | None:
        try:
            return str(self.api.inspect_container(cid)["Name"]).lstrip("/")
        except DockerNotFound:
            return None
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not inspect container {cid[:12]}") from exc

    def set_egress(self, cid: str, egress: EgressConfig) -> bool:
        """Give a running task's proxy new rules (a new proxy container on the same network).

        Returns False when the container has no egress proxy. The task container keeps its
        label with the rules it was created with; the service passes the current ones on start.
        """
        name, proxies = self._egress_of(cid)
        if not name or not proxies:
            return False
        net_name = f"{name}-net"
        try:
            old = self.api.inspect_container(proxies[0]["Id"])
            labels = {k: v for k, v in (old["Config"].get("Labels") or {}).items()}
            host_config = old["HostConfig"]
            for p in proxies:
                self.api.remove_container(p["Id"], force=True, v=True)
            proxy = self.api.create_container(
                egress.image, name=f"{name}-egress", user=PROXY_UID,
                environment={"TASKBOX_SQUID_CONF": squid_config(egress.rules)}, labels=labels,
                host_config=self.api.create_host_config(
                    network_mode=egress.outside_network, cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
                    read_only=True, tmpfs={"/tmp": "size=16m,mode=1777"}, pids_limit=64,
                    mem_limit=host_config.get("Memory") or 128 * 1024**2,
                    memswap_limit=host_config.get("MemorySwap") or 128 * 1024**2,
                    nano_cpus=host_config.get("NanoCpus") or int(0.5e9), init=True, ipc_mode="private",
                    log_config=LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"})),
            )["Id"]
            self.api.connect_container_to_network(proxy, net_name, aliases=[PROXY_ALIAS])
            self.api.start(proxy)
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not update the egress proxy of {name}") from exc
        self._wait_proxy(proxy)
        return True

    def capture(self, cid: str, argv: list[str], *, sink: BinaryIO | None = None, limit: int = 4 << 20,
                env: dict[str, str] | None = None, timeout: float = 300) -> Captured:
        """Run ``argv`` in ``/workspace`` as the sandbox user; bytes out, bounded.

        For taskbox's own commands on the workspace (git): stdout is kept as bytes (or
        streamed to ``sink``) up to ``limit``; ``truncated`` says the rest was dropped.
        """
        secs = max(1, int(timeout + 0.999))
        uid, gid = sandbox_owner()
        out, err = bytearray(), bytearray()
        written = 0
        truncated = False
        mark = secrets.token_hex(8)
        # The in-container `timeout` is the agent's to stop (SIGSTOP): the host keeps its own
        # deadline and kills the command's processes from outside when it passes.
        expired = threading.Event()

        def deadline() -> None:
            expired.set()
            self.kill_marked(cid, mark)

        watchdog = threading.Timer(secs + 10, deadline)
        watchdog.daemon = True
        try:
            exec_id = self._exec_create(cid, ["timeout", "-k", "2", str(secs), *argv],
                                           workdir=CONTAINER_WORKSPACE, user=f"{uid}:{gid}",
                                           environment={"LC_ALL": "C", **(env or {}), KILL_MARK: mark})
            watchdog.start()
            for chunk_out, chunk_err in self._exec_start(exec_id, stream=True, demux=True):
                if chunk_out:
                    room = limit - written
                    part = chunk_out[:max(room, 0)]
                    if part:
                        if sink is not None:
                            sink.write(part)
                        else:
                            out += part
                        written += len(part)
                    if len(chunk_out) > len(part):
                        truncated = True  # keep draining so the command can finish
                if chunk_err and len(err) < 65536:
                    err += chunk_err[:65536 - len(err)]
            code = self.api.exec_inspect(exec_id).get("ExitCode")
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"exec failed in {cid[:12]}") from exc
        finally:
            watchdog.cancel()
        if expired.is_set():
            raise CommandTimeout(f"taskbox's own command in the sandbox did not finish within {secs}s and was killed")
        return Captured(exit_code=-1 if code is None else int(code), stdout=bytes(out),
                        stderr=err.decode(errors="replace"), truncated=truncated)

    @contextmanager
    def scratch(self, image: str, workspace: Path, labels: dict[str, str], *, network: str = "none",
                ro_binds: dict[str, str] | None = None) -> Iterator[str]:
        """A throwaway hardened container that mounts only ``workspace`` (no network), removed after.

        For work on a workspace whose task container is not running: the agent-written
        repository is read inside a sandbox, never by a host process. ``network="open"`` and
        ``ro_binds`` are for filling a shared cache (:mod:`taskbox.caches`).
        """
        spec = ContainerSpec(name=f"taskbox-scratch-{secrets.token_hex(6)}", image=image, workspace=workspace,
                             labels={**labels, LABEL_SCRATCH: "1"}, memory="1g", cpus=1.0, pids_limit=256,
                             network=network, ro_binds=dict(ro_binds or {}))
        cid = self.create(spec)
        try:
            yield cid
        finally:
            try:
                self.api.remove_container(cid, force=True)
            except DOCKER_ERRORS:
                pass  # doctor finds a leftover by its label

    def kill_marked(self, cid: str, mark: str) -> int:
        """Kill every process in the container that carries an exec's ``TASKBOX_EXEC`` mark.

        Catches children that escaped the timeout's process group with ``setsid`` or a
        double fork. Done from the host through the container's cgroup when possible — that
        needs no new process in the container, so it works even when a fork bomb has used up
        every pid — else by a script run inside. A process that also wiped its environment
        is not found (see docs/safety.md). Returns how many processes were killed (host side).
        """
        procs = self._cgroup(cid).get("pids") or self._cgroup(cid).get("memory")
        needle = f"{KILL_MARK}={mark}".encode()
        if procs is not None and (procs / "cgroup.procs").exists():
            killed = 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                found = 0
                try:
                    pids = [int(p) for p in (procs / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                for pid in pids:
                    try:
                        env = Path(f"/proc/{pid}/environ").read_bytes()
                    except OSError:
                        continue
                    if needle in env.split(b"\0"):
                        found += 1
                        try:
                            os.kill(pid, 9)
                            killed += 1
                        except OSError:
                            pass
                if not found:
                    return killed
                time.sleep(0.02)  # forks in flight: sweep again
            return killed
        script = (f'for p in /proc/[0-9]*; do tr "\\0" "\\n" < "$p/environ" 2>/dev/null '
                  f'| grep -qx "{KILL_MARK}={mark}" && kill -9 "${{p#/proc/}}" 2>/dev/null; done; true')
        uid, gid = sandbox_owner()
        try:
            exec_id = self._exec_create(cid, ["sh", "-c", script], user=f"{uid}:{gid}")
            self._exec_start(exec_id)
        except DOCKER_ERRORS:
            pass  # the container may be gone; nothing left to kill then
        return 0

    # --- running work: agent commands and background jobs -------------------------------------

    def running(self, cid: str) -> list[dict[str, Any]]:
        """The agent's commands and background jobs running in the container now.

        Found by their ``TASKBOX_EXEC`` marks (``cmd-…`` for commands, ``job-…`` for jobs),
        from the host through the container's cgroup when possible, else by a script run
        inside. Each entry: ``kind`` (command or job), ``id``, ``pids`` and ``command``
        (from the process's own command line: agent-controlled text, bounded).
        """
        procs = self._cgroup(cid).get("pids") or self._cgroup(cid).get("memory")
        found: dict[str, tuple[int, list[str], int]] = {}  # mark -> (lowest pid, its argv, process count)
        if procs is not None and (procs / "cgroup.procs").exists():
            try:
                pids = [int(p) for p in (procs / "cgroup.procs").read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                mark = _mark_of(_read_proc(pid, "environ"))
                if mark is None:
                    continue
                first, argv, count = found.get(mark, (pid, [], 0))
                if pid <= first or not argv:
                    first, argv = pid, [a.decode(errors="replace") for a in _read_proc(pid, "cmdline").split(b"\0")[:12]]
                found[mark] = (first, argv, count + 1)
        else:
            script = (f'for p in /proc/[0-9]*; do m=$(tr "\\0" "\\n" < "$p/environ" 2>/dev/null '
                      f'| grep -m1 "^{KILL_MARK}=\\({CMD_MARK}\\|{JOB_MARK}\\)"); [ -n "$m" ] || continue; '
                      f'printf "%s %s " "${{p#/proc/}}" "${{m#{KILL_MARK}=}}"; head -c 4000 "$p/cmdline" '
                      f'| tr "\\0\\n" "\\001 "; echo; done 2>/dev/null; true')
            try:
                res = self.capture(cid, ["sh", "-c", script], limit=256 * 1024, timeout=30)
            except SandboxError:
                return []
            for line in res.stdout.decode(errors="replace").splitlines():
                pid_s, _, rest = line.partition(" ")
                mark, _, cmdline = rest.partition(" ")
                if not pid_s.isdigit() or not mark.startswith((CMD_MARK, JOB_MARK)):
                    continue
                first, argv, count = found.get(mark, (int(pid_s), [], 0))
                if int(pid_s) <= first or not argv:
                    first, argv = int(pid_s), cmdline.split("\x01")[:12]
                found[mark] = (first, argv, count + 1)
        out = []
        for mark, (_pid, argv, count) in sorted(found.items()):
            kind = "job" if mark.startswith(JOB_MARK) else "command"
            out.append({"kind": kind, "id": mark.removeprefix(JOB_MARK) if kind == "job" else mark,
                        "mark": mark, "pids": count, "command": _display_command(argv)})
        return out

    def start_job(self, cid: str, job_id: str, command: str, *, workdir: str = CONTAINER_WORKSPACE,
                  env: dict[str, str] | None = None, timeout: float | None = None) -> None:
        """Start ``command`` as a background job in the container and return at once.

        The job lives in the container, not in this process: its merged stdout and stderr go
        to ``JOBS_DIR/<id>/output`` (cut at JOB_OUTPUT_LIMIT while the job keeps running),
        its exit code to ``exit`` when it ends. It carries the mark ``job-<id>``. ``dd`` copies
        each pipe read as it comes (``head`` would hold output back in its buffer) and stops
        after JOB_OUTPUT_LIMIT bytes at most; ``cat`` then drains the rest so the job never blocks.
        """
        if not JOB_ID.match(job_id):
            raise InvalidInput(f"bad job id {job_id!r}")
        limit = f"timeout -k 2 {max(1, int(timeout + 0.999))} " if timeout else ""
        wrapper = (f'd={JOBS_DIR}/"$1"; mkdir -p "$d" && printf %s "$2" > "$d/command" && '
                   f'date +%s > "$d/started" || exit 1; '
                   f'{{ {limit}sh -c "$2" < /dev/null 2>&1; echo $? > "$d/exit.tmp"; }} '
                   f'| {{ dd bs=65536 count={JOB_OUTPUT_LIMIT // 65536} status=none > "$d/output"; cat > /dev/null; }}; '
                   f'mv "$d/exit.tmp" "$d/exit"')
        uid, gid = sandbox_owner()
        try:
            exec_id = self._exec_create(cid, ["sh", "-c", wrapper, "taskbox-job", job_id, command],
                                           workdir=workdir, user=f"{uid}:{gid}",
                                           environment={**(env or {}), KILL_MARK: JOB_MARK + job_id})
            self._exec_start(exec_id, detach=True)
        except DockerNotFound as exc:
            raise SandboxError(f"container {cid[:12]} is gone; run `taskbox doctor --fix`") from exc
        except DOCKER_ERRORS as exc:
            raise docker_engine.translate(exc, f"could not start a job in {cid[:12]}") from exc

    def jobs(self, cid: str, limit: int = 100) -> list[dict[str, Any]]:
        """The background jobs recorded in the container (newest first), with their state.

        The job directory is writable by the agent: every field is read bounded and checked.
        """
        script = (f'cd {JOBS_DIR} 2>/dev/null || exit 0; for d in $(ls -t | head -n {int(limit)}); do '
                  f'case "$d" in j-*) ;; *) continue;; esac; '
                  f'printf "%s\\t%s\\t%s\\t%s\\t" "$d" "$(head -c 20 "$d/started" 2>/dev/null)" '
                  f'"$(head -c 20 "$d/exit" 2>/dev/null)" "$(stat -c %s "$d/output" 2>/dev/null)"; '
                  f'head -c 300 "$d/command" 2>/dev/null | tr "\\n\\t\\r" "   "; echo; done')
        res = self.capture(cid, ["sh", "-c", script], limit=limit * 512, timeout=30)
        alive = {r["id"] for r in self.running(cid) if r["kind"] == "job"}
        out = []
        for line in res.stdout.decode(errors="replace").splitlines():
            parts = line.split("\t", 4)
            if len(parts) != 5 or not JOB_ID.match(parts[0]):
                continue
            out.append(_job_row(parts[0], parts[1], parts[2], parts[3], parts[4], parts[0] in alive))
        return out

    def job(self, cid: str, job_id: str) -> dict[str, Any]:
        """One job's state (see :meth:`jobs`); :class:`NotFound` if the container has no such job."""
        if not JOB_ID.match(job_id):
            raise InvalidInput(f"job id {job_id!r} is not of the form j-<8 hex digits>")
        script = (f'd={JOBS_DIR}/{job_id}; [ -d "$d" ] || exit 3; '
                  f'printf "%s\\t%s\\t%s\\t" "$(head -c 20 "$d/started" 2>/dev/null)" '
                  f'"$(head -c 20 "$d/exit" 2>/dev/null)" "$(stat -c %s "$d/output" 2>/dev/null)"; '
                  f'head -c 2000 "$d/command" 2>/dev/null')
        res = self.capture(cid, ["sh", "-c", script], limit=4096, timeout=30)
        if res.exit_code == 3:
            raise NotFound(f"no job {job_id} in this task (see the task's status for its jobs)", job_id=job_id)
        parts = res.stdout.decode(errors="replace").split("\t", 3)
        parts += [""] * (4 - len(parts))
        alive = any(r["kind"] == "job" and r["id"] == job_id for r in self.running(cid))
        return _job_row(job_id, parts[0], parts[1], parts[2], parts[3], alive)

    def job_output(self, cid: str, job_id: str, offset: int = 0, limit: int = 64 * 1024) -> tuple[bytes, int]:
        """Up to ``limit`` bytes of a job's output from byte ``offset``, and the output's size now."""
        if not JOB_ID.match(job_id):
            raise InvalidInput(f"job id {job_id!r} is not of the form j-<8 hex digits>")
        script = (f'f={JOBS_DIR}/{job_id}/output; [ -d {JOBS_DIR}/{job_id} ] || exit 3; '
                  f's=$(stat -c %s "$f" 2>/dev/null || echo 0); echo "$s"; '
                  f'tail -c +$(({int(offset)} + 1)) "$f" 2>/dev/null | head -c {int(limit)}')
        res = self.capture(cid, ["sh", "-c", script], limit=int(limit) + 32, timeout=60)
        if res.exit_code == 3:
            raise NotFound(f"no job {job_id} in this task (see the task's status for its jobs)", job_id=job_id)
        head, _, data = res.stdout.partition(b"\n")
        size = int(head) if head.strip().isdigit() else 0
        return data[:limit], size

    def kill_job(self, cid: str, job_id: str) -> int:
        """Kill a background job's whole process tree; returns how many processes were killed."""
        if not JOB_ID.match(job_id):
            raise InvalidInput(f"job id {job_id!r} is not of the form j-<8 hex digits>")
        return self.kill_marked(cid, JOB_MARK + job_id)

    def _container_oom_flag(self, cid: str) -> bool:
        try:
            return bool(self.api.inspect_container(cid)["State"].get("OOMKilled"))
        except DOCKER_ERRORS:
            return False


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read(_PROC_READ)
    except OSError:
        return b""


def _mark_of(environ: bytes) -> str | None:
    """The command or job mark in a process's environment, if it has one."""
    prefix = f"{KILL_MARK}=".encode()
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            mark = item[len(prefix):].decode(errors="replace")
            return mark if mark.startswith((CMD_MARK, JOB_MARK)) and len(mark) <= 64 else None
    return None


def _display_command(argv: list[str]) -> str:
    """The agent's command from a marked process's argv (``timeout …`` and ``sh -c`` peeled off)."""
    if len(argv) > 6 and argv[:2] == ["sh", "-c"] and argv[3] == _WRAPPER_NAME:
        argv = argv[6:]  # Sandbox.exec's end-marker wrapper
    if argv and argv[0].endswith("timeout") and len(argv) > 4:
        argv = argv[4:]
    if len(argv) >= 6 and argv[:2] == ["sh", "-c"] and argv[3] == "taskbox-job":
        text = argv[5]
    elif len(argv) >= 3 and argv[:2] == ["sh", "-c"]:
        text = argv[2]
    else:
        text = shlex.join(a for a in argv if a)
    return text if len(text) <= 200 else text[:197] + "..."


def _job_row(job_id: str, started: str, exit_code: str, size: str, command: str, alive: bool) -> dict[str, Any]:
    code = int(exit_code.strip()) if exit_code.strip().lstrip("-").isdigit() else None
    state = "exited" if code is not None else "running" if alive else "killed"
    return {"job_id": job_id, "command": command[:2000], "status": state, "exit_code": code,
            "started_at": int(started.strip()) if started.strip().isdigit() else None,
            "output_bytes": int(size.strip()) if size.strip().isdigit() else 0}


def _cgroup_memory(mem: Path, pids: Path | None) -> dict[str, int]:
    stat = dict(line.split(" ", 1) for line in (mem / "memory.stat").read_text().splitlines() if " " in line)
    if (mem / "memory.usage_in_bytes").exists():  # cgroup v1
        usage = int((mem / "memory.usage_in_bytes").read_text())
        limit = int((mem / "memory.limit_in_bytes").read_text())
        cache = int(stat.get("total_inactive_file", 0))
    else:
        usage = int((mem / "memory.current").read_text())
        raw = (mem / "memory.max").read_text().strip()
        limit = 0 if raw == "max" else int(raw)
        cache = int(stat.get("inactive_file", 0))
    count = 0
    if pids is not None and (pids / "pids.current").exists():
        count = int((pids / "pids.current").read_text())
    return {"usage": max(0, usage - cache), "limit": limit, "pids": count}


def _encode_egress(egress: EgressConfig) -> str:
    data = {"rules": egress.rules.to_dict(), "outside_network": egress.outside_network, "image": egress.image}
    return base64.b64encode(json.dumps(data, sort_keys=True).encode()).decode()


def _decode_egress(text: str) -> EgressConfig:
    from .network import EgressRules

    data = json.loads(base64.b64decode(text))
    return EgressConfig(EgressRules.build(**data["rules"]), data["outside_network"], data["image"])


def _docker_time(stamp: str) -> float:
    """A docker log timestamp (RFC 3339, nanoseconds) as seconds since the epoch, rounded down."""
    from datetime import datetime

    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + float(f"0.{frac[:6] or '0'}") - 0.001


def end_marker(tail: bytes, nonce: str) -> tuple[int, int] | None:
    """The end marker at the very end of an exec's stdout: (its length in bytes, the exit code
    it carries), or None when the stream ended without it."""
    m = re.search(b"\n" + re.escape(nonce.encode()) + rb" (-?[0-9]{1,3})\n\Z", tail)
    return None if m is None else (len(m.group()), int(m.group(1)))


def _short(argv: list[str]) -> str:
    text = shlex.join(argv)
    return text if len(text) <= 120 else text[:117] + "..."



