"""The host's side of the in-sandbox exec agent: a command without a ``docker exec``.

Every task container runs a small agent (``recipes/exec-agent``, started with the container)
that listens on a unix socket in a tmpfs only it uses. A command then costs one connection
and one fork in the container instead of a runc process start. The agent runs as the
sandbox user, so the sandboxed code can kill or replace it; the host trusts it with nothing:

* **No link is followed.** The socket is opened ``O_PATH | O_NOFOLLOW`` beneath a descriptor
  of its directory (the engine's volume directory, which the container cannot replace) and
  must be a socket; the connection goes through ``/proc/self/fd/N``, so a socket swapped
  for a link to a host socket is refused, never reached.
* **Answers are authenticated.** The agent makes a random key at start and prints it as the
  container log's first line, which the host reads (:func:`read_key`) before any command of
  the sandbox runs and keeps under ``TASKBOX_HOME`` (:class:`KeyStore`). Every frame carries
  an HMAC over the request's hash, its number, type and payload: a replaced agent has no key
  and is refused; a thief of the socket can drop an answer, never forge one. The agent's
  first frame (``A``) proves the key before the command runs: only after the host checked it
  does it send ``G``, so a stale key (a restart behind taskbox's back) or an impostor means
  nothing ran, and ``docker exec`` runs the command instead.
* **Every read is bounded** (frame sizes, a deadline the host keeps), a violation ends the
  connection, and the caller kills the command's processes itself through the container's
  cgroup. Until the request is sent nothing ran, so the caller falls back to ``docker exec``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import stat
import struct
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

MOUNT_AGENT = "/opt/taskbox-agent"  # the agent script, mounted read-only from the host
MOUNT_RUN = "/run/taskbox"  # the agent's socket directory: a tmpfs volume of its own
SOCKET_NAME = "agent.sock"
RUN_TMPFS = "size=64k,nr_inodes=16,mode=0700"
KEY_PREFIX = b"TASKBOX-AGENT-KEY "
MAX_FRAME = 65536  # the agent sends output in reads of at most this
MAX_EXIT_FRAME = 256
MAC_BYTES = 16
_KEY_LINE = re.compile(rb"^TASKBOX-AGENT-KEY ([0-9a-f]{64})$")


class AgentUnavailable(Exception):
    """The agent could not be reached or verified; nothing was sent, so ``docker exec`` may run the command."""


class AgentBroken(Exception):
    """The agent broke the protocol, fell silent past the deadline or went away after the
    command was sent: the command may have run, so it is not run again."""


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a host-owned file atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def agent_source() -> bytes:
    return resources.files("taskbox").joinpath("recipes/exec-agent").read_bytes()


def launch_command() -> list[str]:
    """The container's main command: the agent, detached (reparented to init), then ``sleep``.

    An image without ``python3`` just sleeps, and taskbox uses ``docker exec``.
    """
    script = ("command -v python3 >/dev/null 2>&1 || echo TASKBOX-AGENT-NONE; "
              f"(python3 -I {MOUNT_AGENT}/exec-agent {MOUNT_RUN}/{SOCKET_NAME} </dev/null 2>/dev/null &); "
              "exec sleep infinity")
    return ["sh", "-c", script]


def install(home: Path) -> Path:
    """The host directory holding this version of the agent script (made once, atomically)."""
    data = agent_source()
    folder = home / "exec-agent" / hashlib.sha256(data).hexdigest()[:12]
    target = folder / "exec-agent"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        _write(target, data, 0o644)
    return folder


def read_key(log: bytes) -> bytes | None | bool:
    """The agent's key from the first line of a container start's log; False when that line
    says there is no agent (no ``python3`` in the image), None when there is no line yet."""
    if b"\n" not in log:
        return None
    first = log.split(b"\n", 1)[0].strip()
    m = _KEY_LINE.match(first)
    return bytes.fromhex(m.group(1).decode()) if m else False


class KeyStore:
    """The agents' keys and socket directories, one file per container (``<dir>/<container id>``,
    mode 0600). A container restarted behind taskbox's back has a new key: its agent fails the
    first check and commands go through ``docker exec`` until taskbox starts it again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, tuple[str, bytes]] = {}

    def save(self, cid: str, run_dir: str, key: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(self.folder / cid, json.dumps({"run_dir": run_dir, "key": key.hex()}).encode(), 0o600)
        self._cache[cid] = (run_dir, key)

    def load(self, cid: str) -> tuple[str, bytes] | None:
        if cid in self._cache:
            return self._cache[cid]
        try:
            with open(self.folder / cid, "rb") as fh:
                data = json.loads(fh.read(4096))
            entry = (str(data["run_dir"]), bytes.fromhex(data["key"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._cache[cid] = entry
        return entry

    def drop(self, cid: str) -> None:
        self._cache.pop(cid, None)
        try:
            os.unlink(self.folder / cid)
        except OSError:
            pass


def connect(run_dir: str, timeout: float = 2.0) -> socket.socket:
    """Connect to the agent's socket in ``run_dir`` without following a link (see the module doc)."""
    try:
        dfd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise AgentUnavailable(f"no agent directory ({exc.strerror})") from exc
    try:
        try:
            sfd = os.open(SOCKET_NAME, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise AgentUnavailable(f"no agent socket ({exc.strerror})") from exc
        try:
            if not stat.S_ISSOCK(os.fstat(sfd).st_mode):
                raise AgentUnavailable("the agent's socket is not a socket (a link or a file put there)")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(f"/proc/self/fd/{sfd}")
            except OSError as exc:
                sock.close()
                raise AgentUnavailable(f"the agent does not answer ({exc.strerror or exc})") from exc
            return sock
        finally:
            os.close(sfd)
    finally:
        os.close(dfd)


def run(run_dir: str, key: bytes, argv: list[str], *, cwd: str, env: dict[str, str], deadline: float,
        on_output: Callable[[bytes, bytes], None], connect_timeout: float = 2.0) -> int:
    """Run ``argv`` through the agent; output goes to ``on_output(kind, data)`` (``O``/``E``).

    Returns the exit status the agent reports, authenticated. Raises :class:`AgentUnavailable`
    before anything was sent and :class:`AgentBroken` after (a bad MAC or frame, an oversized
    frame, the agent gone, or ``deadline`` — a ``time.monotonic()`` value — passed).
    """
    sock = connect(run_dir, connect_timeout)
    try:
        request = json.dumps({"argv": argv, "cwd": cwd, "env": env, "nonce": secrets.token_hex(16)}).encode()
        try:
            sock.sendall(struct.pack(">I", len(request)) + request)
        except OSError as exc:
            raise AgentUnavailable(f"the agent does not take requests ({exc.strerror or exc})") from exc
        context = hashlib.sha256(request).digest()
        reader = _Reader(sock, min(deadline, time.monotonic() + connect_timeout))
        try:
            _frame(reader, key, context, 0, b"A")
            sock.sendall(b"G")
        except (AgentBroken, OSError) as exc:  # an impostor, a stale key, a silent agent: nothing ran
            raise AgentUnavailable(f"the exec agent failed its check: {exc}") from exc
        reader.deadline = deadline
        count = 1
        while True:
            kind, payload = _frame(reader, key, context, count)
            count += 1
            if kind == b"X":
                try:
                    code = json.loads(payload)["code"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise AgentBroken("the exec agent sent a malformed exit status") from exc
                if not isinstance(code, int) or isinstance(code, bool) or not -1 <= code <= 255:
                    raise AgentBroken("the exec agent sent an exit status out of range")
                return code
            on_output(kind, payload)
    finally:
        sock.close()


def _frame(reader: _Reader, key: bytes, context: bytes, count: int,
           expect: bytes | None = None) -> tuple[bytes, bytes]:
    """One frame, its size bounded and its MAC checked."""
    head = reader.exact(5)
    kind, size = head[:1], struct.unpack(">I", head[1:])[0]
    allowed = (expect,) if expect else (b"O", b"E", b"X")
    if kind not in allowed or size > (MAX_EXIT_FRAME if kind in (b"X", b"A") else MAX_FRAME):
        raise AgentBroken("the exec agent sent a malformed frame")
    payload = reader.exact(size)
    mac = reader.exact(MAC_BYTES)
    want = hmac.new(key, context + struct.pack(">Q", count) + head + payload, "sha256").digest()
    if not hmac.compare_digest(mac, want[:MAC_BYTES]):
        raise AgentBroken("the exec agent's answer failed authentication (it was replaced or tampered with)")
    return kind, payload


class _Reader:
    """Exact reads from the agent's socket, none past the deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise AgentBroken("the exec agent did not answer in time")
            self.sock.settimeout(min(left, 5.0))
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                continue
            except OSError as exc:
                raise AgentBroken(f"the exec agent's connection failed ({exc.strerror or exc})") from exc
            if not chunk:
                raise AgentBroken("the exec agent went away before the command's end")
            buf += chunk
        return bytes(buf)
