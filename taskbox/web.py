"""`taskbox serve`: the HTTP API, the live event stream, MCP over HTTP, Prometheus metrics and
the web dashboard, in one ASGI application (Starlette, served by uvicorn).

A thin adapter over :class:`~taskbox.service.TaskService` (STYLE rule 1): every REST route
maps to one service call run on a worker thread, and every
:class:`~taskbox.errors.TaskboxError` becomes a JSON body ``{"error", "message", …}`` with
the status code the exception carries (:attr:`TaskboxError.http_status`). Behaviour —
hooks, policy, events — stays in the service.

- ``/api/…``: the REST API (:data:`ROUTES`; the OpenAPI document at ``/api/openapi.json``).
- ``/api/events``: a WebSocket of the registry's durable event log. Events written by any
  process appear (the log is polled by id), ``?since=ID`` replays the events after ``ID``,
  ``task=`` and ``type=`` filter. Output of running commands — whichever process runs them —
  is in the log as ``exec.output`` events (:mod:`taskbox.live_output`). Each client has a
  bounded queue; a client that falls behind is caught up from the log instead of being sent
  an unbounded backlog.
- ``/mcp``: the same MCP server as ``taskbox mcp --http`` (streamable HTTP).
- ``/metrics``: Prometheus metrics computed from the registry and its event log, so they
  are right whichever process did the work.
- ``/``: the dashboard (``taskbox/web_static``: hand-written HTML, CSS and JavaScript; no
  build step). Everything it shows of a workspace is hostile and is rendered as text.

Access: loopback only by default (requests must name a loopback host, which defeats DNS
rebinding). Binding any other address needs a token (:func:`load_token`), checked on every
route: ``Authorization: Bearer`` or the HttpOnly cookie the dashboard gets by opening
``/?token=…`` once. WebSocket handshakes and state-changing requests from another origin are
refused, and API writes must be JSON (a cross-site form cannot send that).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import __version__, files
from .errors import InvalidInput, TaskboxError
from .models import ContainerState, Status
from .results import plain
from .sandbox import ExecControl

if TYPE_CHECKING:
    from .service import TaskService

log = logging.getLogger("taskbox.web")
STATIC = Path(__file__).with_name("web_static")
TOKEN_FILE = "serve-token"
BODY_LIMIT = 1024 * 1024  # bytes of a request body
EVENT_LIMIT = 64 * 1024  # bytes of one event message; a bigger payload is replaced by a note
DIFF_LIMIT = 500_000  # characters of a diff returned
POLL_INTERVAL = 0.05  # seconds between reads of the event log while clients listen
QUEUE_SIZE = 2000  # messages queued per WebSocket client before it is caught up from the log
MAX_CLIENTS = 200  # WebSocket clients at once
SEND_TIMEOUT = 30.0  # seconds a client may take to accept one message before it is dropped
WORKER_THREADS = 32  # service calls running at once; further calls queue
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
SECURITY_HEADERS = {
    # The dashboard loads only its own files and never runs inline script: an injected
    # <script> or event attribute would not run even if some text escaped escaping.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
                               "object-src 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


# --- access ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address to bind or a Host header's name) is this machine only."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def load_token(home: Path, create: bool = True) -> str | None:
    """The server's access token, stored owner-only in ``TASKBOX_HOME/serve-token``; made
    (atomically) on first use when ``create``."""
    path = home / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if len(token) >= 32:
            path.chmod(0o600)
            return token
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InvalidInput(f"cannot read the server token {path}: {exc.strerror}") from exc
    if not create:
        return None
    token = secrets.token_urlsafe(32)
    files.write_durably(path, token.encode() + b"\n", 0o600)
    return token


@dataclass
class Access:
    """Who may use the server: the bound host, an optional token, extra allowed origins."""

    host: str
    port: int
    token: str | None = None
    allow_origins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise InvalidInput(f"binding {self.host} (not loopback) needs an access token; "
                               "`taskbox serve` makes one under TASKBOX_HOME")

    @property
    def cookie(self) -> str:
        return f"taskbox_token_{self.port}"

    def check(self, conn: HTTPConnection, method: str) -> tuple[int, str] | None:
        """Why a request or WebSocket handshake is refused (status, message), or None."""
        headers = conn.headers
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if is_loopback(self.host) and not is_loopback(name):
            return 403, f"host {host!r} is not this server's loopback address"
        unsafe = conn.scope["type"] == "websocket" or method not in ("GET", "HEAD", "OPTIONS")
        origin = headers.get("origin")
        if unsafe and origin is not None and origin not in self.allow_origins and \
                origin not in (f"http://{host}", f"https://{host}"):
            return 403, f"cross-origin request from {origin[:100]!r} refused"
        if unsafe and headers.get("sec-fetch-site") == "cross-site":
            return 403, "cross-site request refused"
        if self.token and not self.authorized(conn):
            return 401, "this server needs its access token (Authorization: Bearer, or open /?token=…)"
        return None

    def authorized(self, conn: HTTPConnection) -> bool:
        assert self.token is not None
        auth = conn.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else conn.cookies.get(self.cookie, "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())


class Guard:
    """ASGI middleware: access checks on every HTTP request and WebSocket handshake, the
    dashboard's one-time ``?token=`` login, and security headers on every response."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        method = scope.get("method", "GET")
        if scope["type"] == "http" and self.access.token and conn.url.path == "/" and "token" in conn.query_params:
            given = conn.query_params["token"]
            if hmac.compare_digest(given.encode(), self.access.token.encode()):
                # The token leaves the address bar at once; the cookie is unreadable by script.
                response: Response = RedirectResponse("/", status_code=303)
                response.set_cookie(self.access.cookie, given, httponly=True, samesite="strict", path="/")
                await self._send(response, scope, receive, send)
                return
        refused = self.access.check(conn, method)
        if refused is not None:
            status, message = refused
            if scope["type"] == "websocket":
                await send({"type": "websocket.http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "websocket.http.response.body",
                            "body": json.dumps({"error": "forbidden", "message": message}).encode()})
                return
            await self._send(error_response(status, "unauthorized" if status == 401 else "forbidden", message),
                             scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode().lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _send(self, response: Response, scope: Scope, receive: Receive, send: Send) -> None:
        for k, v in SECURITY_HEADERS.items():
            response.headers[k] = v
        await response(scope, receive, send)


# --- JSON --------------------------------------------------------------------------------------


def _dumps(data: Any) -> bytes:
    return json.dumps(data, default=plain, ensure_ascii=False, allow_nan=False).encode()


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _dumps(content)


def error_response(status: int, code: str, message: str, **details: Any) -> Response:
    return JSON({"error": code, "message": message, **details}, status_code=status)


# --- the live event stream -----------------------------------------------------------------------


@dataclass(eq=False)
class Subscriber:
    """One WebSocket client: its filters and bounded queue."""

    tasks: frozenset[str]
    types: tuple[str, ...]
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagged: bool = False

    def wants(self, message: dict[str, Any]) -> bool:
        if self.tasks and message.get("task_id") not in self.tasks:
            return False
        if not self.types:
            return True
        kind = str(message.get("type", ""))
        return any(kind == t or (t.endswith(".") and kind.startswith(t)) or (t.endswith("*") and
                   kind.startswith(t[:-1])) for t in self.types)


def event_message(row: dict[str, Any]) -> dict[str, Any]:
    """An event row as sent to clients (bounded: a huge payload is replaced by a note)."""
    message = {"kind": "event", "id": row["id"], "type": row["type"], "task_id": row["task_id"], "ts": row["ts"],
               "payload": row["payload"]}
    size = len(_dumps(message))
    if size > EVENT_LIMIT:
        message["payload"] = {"truncated": True, "bytes": size}
    return message


class EventHub:
    """Reads the registry's event log by id while clients listen, and fans events out to them.

    One reader for all clients: the cost of a listener is a queue, not a database query.
    """

    def __init__(self, service: TaskService, interval: float = POLL_INTERVAL) -> None:
        self.service = service
        self.interval = interval
        self.subscribers: set[Subscriber] = set()
        self.position = 0  # the id of the newest event published
        self._wake = asyncio.Event()

    async def run(self) -> None:
        self.position = await anyio.to_thread.run_sync(self.service.last_event_id)
        while True:
            if not self.subscribers:
                self._wake.clear()
                await self._wake.wait()
            rows = await anyio.to_thread.run_sync(lambda: self.service.events(after_id=self.position, limit=1000))
            for row in rows:
                self.publish(event_message(self.service.redactor(row)))
                self.position = row["id"]
            if len(rows) < 1000:
                await asyncio.sleep(self.interval)

    def subscribe(self, tasks: Iterable[str], types: Iterable[str]) -> Subscriber:
        if len(self.subscribers) >= MAX_CLIENTS:
            raise InvalidInput(f"this server already streams to {MAX_CLIENTS} clients")
        sub = Subscriber(frozenset(tasks), tuple(types))
        self.subscribers.add(sub)
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, message: dict[str, Any]) -> None:
        message = {**message, "_text": _dumps(message).decode()}  # encoded once for every client
        for sub in list(self.subscribers):
            if sub.lagged or not sub.wants(message):
                continue
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                sub.lagged = True  # its sender catches it up from the log

    async def stream(self, ws: WebSocket) -> None:
        """Serve one WebSocket client until it leaves."""
        params = ws.query_params
        since_text = params.get("since")
        try:
            since = int(since_text) if since_text not in (None, "") else None
            if since is not None and since < 0:
                raise ValueError
        except ValueError:
            await ws.close(code=1008, reason="since must be an event id (0 or more)")
            return
        tasks = [t for v in params.getlist("task") for t in v.split(",") if t]
        types = [t for v in params.getlist("type") for t in v.split(",") if t]
        try:
            sub = self.subscribe(tasks, types)
        except InvalidInput as exc:
            await ws.close(code=1013, reason=exc.message[:120])
            return
        await ws.accept()
        try:
            async with anyio.create_task_group() as tg:
                async def receive() -> None:
                    with contextlib.suppress(WebSocketDisconnect):
                        while True:
                            await ws.receive_text()  # clients say nothing; this notices they left
                    tg.cancel_scope.cancel()

                tg.start_soon(receive)
                await self._send_loop(ws, sub, since)
                tg.cancel_scope.cancel()
        except (WebSocketDisconnect, TimeoutError, OSError, RuntimeError):
            pass
        finally:
            self.unsubscribe(sub)

    async def _send_loop(self, ws: WebSocket, sub: Subscriber, since: int | None) -> None:
        last = self.position if since is None else since
        await self._send(ws, {"kind": "hello", "last_id": self.position, "since": last, "version": __version__})
        last = await self._replay(ws, sub, last)
        while True:
            if sub.lagged:
                sub.lagged = False
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                last = await self._replay(ws, sub, last)
                continue
            message = await sub.queue.get()
            if message["kind"] == "event":
                if message["id"] <= last:
                    continue
                last = message["id"]
            await self._send(ws, message)

    async def _replay(self, ws: WebSocket, sub: Subscriber, after: int) -> int:
        """Send the events after ``after`` from the log; return the id of the last one read."""
        task = next(iter(sub.tasks)) if len(sub.tasks) == 1 else None
        while True:
            rows = await anyio.to_thread.run_sync(functools.partial(self.service.events, task, after_id=after, limit=500))
            for row in rows:
                message = event_message(self.service.redactor(row))
                if sub.wants(message):
                    await self._send(ws, message)
                after = row["id"]
            if len(rows) < 500:
                return after

    @staticmethod
    async def _send(ws: WebSocket, message: dict[str, Any]) -> None:
        text = message.get("_text") or _dumps(message).decode()
        with anyio.fail_after(SEND_TIMEOUT):
            await ws.send_text(text)


# --- metrics -------------------------------------------------------------------------------------

EXEC_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
PRESSURE_LEVELS = ("ok", "warning", "critical", "emergency")


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        rows = [(str(edge), count) for edge, count in zip(self.buckets, self.counts, strict=True)]
        return HistogramMetricFamily(name, doc, buckets=[*rows, ("+Inf", self.total)], sum_value=self.sum)


class Metrics(Collector):
    """Prometheus metrics from the registry: task and container states and leases now, and
    counters and histograms folded incrementally from the durable event log (so a restart
    of the server, or work done by another process, counts the same)."""

    def __init__(self, service: TaskService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._after = 0
        self.execs: dict[str, int] = {"ok": 0, "error": 0, "timeout": 0, "oom": 0, "unknown": 0}
        self.exec_seconds = _Histogram(EXEC_BUCKETS)
        self.checkpoints = 0
        self.checkpoint_bytes = 0
        self.checkpoint_seconds = _Histogram(CHECKPOINT_BUCKETS)
        self.restores = 0
        self.restore_seconds = _Histogram(CHECKPOINT_BUCKETS)
        self.egress_denied = 0
        self.policy_denied = 0
        self.events = 0

    def _fold(self) -> None:
        while True:
            rows = self.service.events(after_id=self._after, limit=5000)
            for row in rows:
                self._after = row["id"]
                payload = row["payload"] or {}
                count = int(payload.get("count") or 1) if payload.get("aggregated") else 1
                one = not payload.get("aggregated")
                self.events += count
                kind = row["type"]
                if kind == "task.exec":
                    if not one or "exit_code" not in payload:
                        self.execs["unknown"] += count
                        continue
                    outcome = ("timeout" if payload.get("timed_out") else "oom" if payload.get("oom_killed")
                               else "ok" if payload.get("exit_code") == 0 else "error")
                    self.execs[outcome] += 1
                    self.exec_seconds.observe(float(payload.get("duration_ms") or 0) / 1000)
                elif kind == "checkpoint.created":
                    self.checkpoints += count
                    if one:
                        self.checkpoint_bytes += int(payload.get("bytes_added") or 0)
                        self.checkpoint_seconds.observe(float(payload.get("duration_ms") or 0) / 1000)
                elif kind == "checkpoint.restored":
                    self.restores += count
                    if one and payload.get("duration_ms") is not None:
                        self.restore_seconds.observe(float(payload["duration_ms"]) / 1000)
                elif kind == "egress.denied":
                    self.egress_denied += count
                elif kind == "policy.denied":
                    self.policy_denied += count
            if len(rows) < 5000:
                return

    def collect(self) -> Iterator[Any]:
        with self._lock:
            self._fold()
            tasks = self.service.list_tasks()
            leases = self.service.registry.leases()
            by_status = dict.fromkeys((str(s) for s in Status), 0)
            by_container = dict.fromkeys((str(s) for s in ContainerState), 0)
            for t in tasks:
                by_status[str(t.status)] = by_status.get(str(t.status), 0) + 1
                by_container[str(t.container_state)] = by_container.get(str(t.container_state), 0) + 1
            g = GaugeMetricFamily("taskbox_tasks", "Tasks by status.", labels=["status"])
            for k, v in by_status.items():
                g.add_metric([k], v)
            yield g
            g = GaugeMetricFamily("taskbox_containers", "Task containers by recorded state.", labels=["state"])
            for k, v in by_container.items():
                g.add_metric([k], v)
            yield g
            g = GaugeMetricFamily("taskbox_leases", "Live agent leases (attached sessions).")
            g.add_metric([], len(leases))
            yield g
            g = GaugeMetricFamily("taskbox_task_memory_pressure_level",
                                  "Memory pressure level of each unfinished task: 0 ok, 1 warning, 2 critical, "
                                  "3 emergency.", labels=["task_id"])
            for t in tasks:
                if t.status in (Status.PENDING, Status.ACTIVE, Status.PAUSED):
                    level = str((t.metadata.get("pressure") or {}).get("level", "ok"))
                    g.add_metric([t.id], PRESSURE_LEVELS.index(level) if level in PRESSURE_LEVELS else 0)
            yield g
            c = CounterMetricFamily("taskbox_exec", "Commands run in task sandboxes, by outcome.", labels=["outcome"])
            for k, v in self.execs.items():
                c.add_metric([k], v)
            yield c
            yield self.exec_seconds.family("taskbox_exec_duration_seconds", "Duration of commands run in sandboxes.")
            c = CounterMetricFamily("taskbox_checkpoints", "Checkpoints taken.")
            c.add_metric([], self.checkpoints)
            yield c
            c = CounterMetricFamily("taskbox_checkpoint_bytes", "Bytes checkpoints added to the snapshot stores.")
            c.add_metric([], self.checkpoint_bytes)
            yield c
            yield self.checkpoint_seconds.family("taskbox_checkpoint_duration_seconds", "Time to take a checkpoint.")
            c = CounterMetricFamily("taskbox_checkpoint_restores", "Checkpoints restored.")
            c.add_metric([], self.restores)
            yield c
            yield self.restore_seconds.family("taskbox_checkpoint_restore_duration_seconds",
                                              "Time to restore a checkpoint.")
            c = CounterMetricFamily("taskbox_egress_denied", "Outbound requests the egress proxy refused.")
            c.add_metric([], self.egress_denied)
            yield c
            c = CounterMetricFamily("taskbox_policy_denied", "Operations the project policy refused.")
            c.add_metric([], self.policy_denied)
            yield c
            c = CounterMetricFamily("taskbox_events", "Events recorded in the durable event log.")
            c.add_metric([], self.events)
            yield c
            g = GaugeMetricFamily("taskbox_event_log_last_id", "Id of the newest event in the log.")
            g.add_metric([], self._after)
            yield g


# --- the REST API ---------------------------------------------------------------------------------

Handler = Callable[["Web", Request], Awaitable[Any]]


@dataclass(frozen=True)
class ApiRoute:
    method: str
    path: str
    handler: Handler
    summary: str
    query: tuple[str, ...] = ()
    body: tuple[str, ...] = ()


def _int(request: Request, name: str, default: int, low: int = 0, high: int = 10**9) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be a whole number") from exc
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}")
    return value


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def _list(request: Request, name: str) -> list[str]:
    """A repeatable, comma-separated query parameter (at most 50 values)."""
    values = [v for raw in request.query_params.getlist(name) for v in raw.split(",") if v]
    if len(values) > 50:
        raise InvalidInput(f"at most 50 values of {name}")
    return values


async def _body(request: Request) -> dict[str, Any]:
    """The request's JSON object body (bounded; must be sent as application/json)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise InvalidInput("send the request body as application/json")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_LIMIT:
            raise InvalidInput(f"the request body is larger than {BODY_LIMIT} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


def _str(body: dict[str, Any], name: str, default: str | None = None, *, required: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string")
    return value


class Web:
    """The application's state: the service, the event hub, metrics, running commands."""

    def __init__(self, service: TaskService, access: Access) -> None:
        self.service = service
        self.access = access
        self.hub = EventHub(service)
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(Metrics(service))
        self.limiter = anyio.CapacityLimiter(WORKER_THREADS)
        self._cpu: dict[str, tuple[float, float]] = {}  # task -> (cpu seconds, when): for a live CPU %

    async def call(self, fn: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(fn, limiter=self.limiter)

    # --- tasks ---

    def _row(self, t: Any) -> dict[str, Any]:
        return {**t.to_dict(), "current_agents": self.service.current_agents(t.id)}

    async def tasks(self, request: Request) -> Any:
        statuses = [s for v in request.query_params.getlist("status") for s in v.split(",") if s]
        query = request.query_params.get("q") or None
        parent = request.query_params.get("parent")

        def run() -> list[dict[str, Any]]:
            rows = self.service.list_tasks(statuses or None, query)
            return [self._row(t) for t in rows if parent is None or t.parent_id == parent]

        return {"tasks": await self.call(run)}

    async def create(self, request: Request) -> Any:
        body = await _body(request)
        options: dict[str, Any] = {}
        for key in ("agent", "model", "title", "lock_mode", "memory", "network", "image", "disk", "template"):
            if (value := _str(body, key)) is not None:
                options[key] = value
        if (value := _str(body, "id")) is not None:
            options["task_id"] = value
        if (value := _str(body, "base")) is not None:
            options["base_ref"] = value
        for key in ("cpus",):
            if body.get(key) is not None:
                options[key] = float(body[key])
        if body.get("allow_domains"):
            options["allow_domains"] = [str(d) for d in body["allow_domains"]]
        options["lazy"] = bool(body.get("lazy", False))
        repo = _str(body, "repo", required=True)
        description = _str(body, "description", required=True)
        return await self.call(lambda: self.service.start_task(repo, description, attach=bool(body.get("attach")),
                                                               **options))

    async def show(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return await self.call(lambda: self.service.status(tid, recent=_int(request, "recent", 5, 0, 200)))

    async def exec(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        command = _str(body, "command", required=True)
        workdir = _str(body, "workdir")
        timeout = float(body["timeout"]) if body.get("timeout") is not None else None
        if body.get("background"):
            return await self.call(lambda: self.service.start_job(tid, command, workdir=workdir, timeout=timeout))
        # Its output streams to every client as the service's exec.output events (the same
        # as a command run by any other process); the control only lets a client that goes
        # away kill the command.
        control = ExecControl()

        def run() -> dict[str, Any]:
            try:
                return self.service.exec(tid, command, workdir=workdir, timeout=timeout, control=control).to_dict()
            finally:
                control.done.set()

        try:
            result = await anyio.to_thread.run_sync(run, limiter=self.limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):  # the client went away: kill the command
                await anyio.to_thread.run_sync(control.cancel)
            raise
        return {**result, "exec_id": control.exec_id}

    async def todos(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return {"task_id": tid, "todos": (await self.call(lambda: self.service.state(tid)))["todos"]}

    async def update_todos(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        todos = body.get("todos")
        if not isinstance(todos, list):
            raise InvalidInput("todos must be a list of todo objects")
        return {"task_id": tid, "todos": await self.call(lambda: self.service.update_todos(tid, todos))}

    async def decisions(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return {"task_id": tid, "decisions": await self.call(lambda: self.service.decisions(tid))}

    async def log_decision(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        decision = _str(body, "decision", required=True)
        kw = {k: _str(body, k, "") for k in ("context", "rationale", "alternatives")}
        return await self.call(lambda: self.service.log_decision(tid, decision, agent=_str(body, "agent", "user"),
                                                                 **kw))

    async def history(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return await self.call(lambda: self.service.history(tid, limit=_int(request, "limit", 200, 1, 5000)))

    async def executions(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        limit = _int(request, "limit", 50, 1, 1000)
        return {"task_id": tid, "executions": await self.call(lambda: self.service.executions(tid, limit))}

    async def events(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        after, limit = _int(request, "since", 0), _int(request, "limit", 200, 1, 10_000)
        types, exclude = _list(request, "type"), _list(request, "exclude")
        rows = await self.call(lambda: self.service.events(tid, after_id=after, limit=limit, newest=_flag(request, "newest"),
                                                           types=types, exclude=exclude))
        return {"task_id": tid, "events": [event_message(self.service.redactor(r)) for r in rows]}

    async def diff(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        text = await self.call(lambda: self.service.diff(tid, stat=_flag(request, "stat")))
        return {"task_id": tid, "diff": text[:DIFF_LIMIT], "truncated": len(text) > DIFF_LIMIT}

    async def git_log(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        limit = _int(request, "limit", 50, 1, 1000)
        return {"task_id": tid, "commits": await self.call(lambda: self.service.git_log(tid, limit))}

    async def plan(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return await self.call(lambda: self.service.read_text(tid, "Plan.md", max_bytes=256_000))

    async def files(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        path = request.query_params.get("path", ".")
        return await self.call(lambda: self.service.list_files(tid, path, recursive=_flag(request, "recursive"),
                                                               limit=_int(request, "limit", 500, 1, 5000)))

    async def checkpoints(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return {"task_id": tid, "checkpoints": await self.call(lambda: self.service.list_checkpoints(tid))}

    async def create_checkpoint(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        return await self.call(lambda: self.service.create_checkpoint(
            tid, _str(body, "name"), _str(body, "description", ""),
            include_filesystem=bool(body.get("include_filesystem")), pinned=bool(body.get("pin"))))

    async def restore(self, request: Request) -> Any:
        tid, cp = request.path_params["task_id"], request.path_params["checkpoint_id"]
        body = await _body(request)
        return await self.call(lambda: self.service.restore_checkpoint(
            tid, cp, force=bool(body.get("force")), kill_running=bool(body.get("kill_running"))))

    async def checkpoint_diff(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        a = request.query_params.get("a")
        if not a:
            raise InvalidInput("a (a checkpoint id or name) is required")
        b = request.query_params.get("b") or "current"
        return await self.call(lambda: self.service.checkpoint_diff(tid, a, b))

    async def complete(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        return await self.call(lambda: self.service.complete(
            tid, _str(body, "summary", ""), cleanup=bool(body.get("cleanup")),
            kill_running=bool(body.get("kill_running"))))

    async def abort(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        return (await self.call(lambda: self.service.abort(tid, _str(body, "reason", "")))).to_dict()

    async def jobs(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return {"task_id": tid, "jobs": await self.call(lambda: self.service.jobs(tid))}

    async def job_output(self, request: Request) -> Any:
        tid, job = request.path_params["task_id"], request.path_params["job_id"]
        offset, limit = _int(request, "offset", 0), _int(request, "limit", 64 * 1024, 1, 1024 * 1024)
        return await self.call(lambda: self.service.job_output(tid, job, offset, limit))

    async def kill_job(self, request: Request) -> Any:
        tid, job = request.path_params["task_id"], request.path_params["job_id"]
        await _body(request)
        return await self.call(lambda: self.service.kill_job(tid, job))

    async def subtasks(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        return await self.call(lambda: self.service.subtask_status(tid))

    async def merge(self, request: Request) -> Any:
        tid = request.path_params["task_id"]
        body = await _body(request)
        return await self.call(lambda: self.service.merge_task(tid, _str(body, "into"), squash=bool(body.get("squash"))))

    async def stats(self, request: Request) -> Any:
        return await self.call(lambda: self.service.stats(request.query_params.get("task") or None))

    async def usage(self, request: Request) -> Any:
        """Live memory and CPU of every running task (CPU % since this server's previous sample)."""

        def run() -> list[dict[str, Any]]:
            out = []
            for t in self.service.list_tasks([str(Status.ACTIVE)]):
                try:
                    u = self.service.resource_usage(t.id)
                except (TaskboxError, OSError):
                    u = None
                if u is None:
                    continue
                now, cpu = time.monotonic(), u.get("cpu_seconds")
                before = self._cpu.get(t.id)
                u["cpu_percent"] = None
                if cpu is not None:
                    if before is not None and now > before[1]:
                        u["cpu_percent"] = round(max(0.0, 100.0 * (cpu - before[0]) / (now - before[1])), 1)
                    self._cpu[t.id] = (cpu, now)
                out.append(u)
            return out

        return {"usage": await self.call(run)}

    async def openapi(self, request: Request) -> Any:
        return openapi()


def _t(path: str) -> str:
    return "/api/tasks/{task_id}" + path


ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("GET", "/api/tasks", Web.tasks, "List tasks (filters: status, q, parent).", ("status", "q", "parent")),
    ApiRoute("POST", "/api/tasks", Web.create, "Create a task (a workspace on a new branch and its sandbox).",
             body=("repo", "description", "agent", "model", "title", "id", "lock_mode", "memory", "cpus", "disk",
                   "network", "allow_domains", "image", "base", "lazy", "attach", "template")),
    ApiRoute("GET", _t(""), Web.show, "A task's record with its live state.", ("recent",)),
    ApiRoute("POST", _t("/exec"), Web.exec, "Run a command in the task's sandbox (or start a background job).",
             body=("command", "workdir", "timeout", "background")),
    ApiRoute("GET", _t("/todos"), Web.todos, "The task's todos."),
    ApiRoute("POST", _t("/todos"), Web.update_todos, "Add or change todos (matched by id).", body=("todos",)),
    ApiRoute("GET", _t("/decisions"), Web.decisions, "The task's decision log."),
    ApiRoute("POST", _t("/decisions"), Web.log_decision, "Record a decision.",
             body=("decision", "context", "rationale", "alternatives", "agent")),
    ApiRoute("GET", _t("/history"), Web.history, "Sessions, conversation log and events of the task.", ("limit",)),
    ApiRoute("GET", _t("/executions"), Web.executions, "The task's newest command executions.", ("limit",)),
    ApiRoute("GET", _t("/events"), Web.events,
             "The task's events after an id: the first `limit`, or the last with `newest`; by `type`, `exclude`.",
             ("since", "limit", "newest", "type", "exclude")),
    ApiRoute("GET", _t("/diff"), Web.diff, "The task's changes against the commit it started from.", ("stat",)),
    ApiRoute("GET", _t("/log"), Web.git_log, "The commits of the task branch.", ("limit",)),
    ApiRoute("GET", _t("/plan"), Web.plan, "The task's Plan.md (text; render it as untrusted)."),
    ApiRoute("GET", _t("/files"), Web.files, "List a workspace directory.", ("path", "recursive", "limit")),
    ApiRoute("GET", _t("/checkpoints"), Web.checkpoints, "The task's checkpoints."),
    ApiRoute("POST", _t("/checkpoints"), Web.create_checkpoint, "Take a checkpoint.",
             body=("name", "description", "include_filesystem", "pin")),
    ApiRoute("GET", _t("/checkpoints/diff"), Web.checkpoint_diff, "Files changed between two checkpoints.",
             ("a", "b")),
    ApiRoute("POST", _t("/checkpoints/{checkpoint_id}/restore"), Web.restore, "Restore a checkpoint.",
             body=("force", "kill_running")),
    ApiRoute("POST", _t("/complete"), Web.complete, "Complete the task.", body=("summary", "cleanup", "kill_running")),
    ApiRoute("POST", _t("/abort"), Web.abort, "Abort the task.", body=("reason",)),
    ApiRoute("GET", _t("/jobs"), Web.jobs, "The task's background jobs."),
    ApiRoute("GET", _t("/jobs/{job_id}/output"), Web.job_output, "A background job's output from an offset.",
             ("offset", "limit")),
    ApiRoute("POST", _t("/jobs/{job_id}/kill"), Web.kill_job, "Kill a background job."),
    ApiRoute("GET", _t("/subtasks"), Web.subtasks,
             "An ultrawork parent's sub-tasks (status, dependencies, child task, merge) and progress."),
    ApiRoute("POST", _t("/merge"), Web.merge, "Merge the task's branch into its parent, a task or a branch.",
             body=("into", "squash")),
    ApiRoute("GET", "/api/stats", Web.stats, "Task counts by status (or one task's statistics).", ("task",)),
    ApiRoute("GET", "/api/usage", Web.usage, "Live memory and CPU of running tasks."),
    ApiRoute("GET", "/api/openapi.json", Web.openapi, "This document."),
)


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST API, built from :data:`ROUTES`."""
    error = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, Any] = {}
    for r in ROUTES:
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in ("task_id", "checkpoint_id", "job_id") if "{" + n + "}" in r.path]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in r.query]
        op: dict[str, Any] = {
            "summary": r.summary, "operationId": r.handler.__name__,
            "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                          "default": {"description": "A taskbox error; the status code comes from its class.",
                                      "content": {"application/json": {"schema": error}}}}}
        if params:
            op["parameters"] = params
        if r.method == "POST":
            op["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {n: {} for n in r.body}}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    paths["/api/events"] = {"get": {"summary": "WebSocket: the live event stream (query: since, task, type).",
                                    "operationId": "events_stream",
                                    "responses": {"101": {"description": "Switching to WebSocket"}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "taskbox", "version": __version__,
                     "description": "The taskbox service: tasks, sandboxes, checkpoints and events."},
            "paths": paths,
            "components": {"schemas": {"Error": {"type": "object", "required": ["error", "message"], "properties": {
                "error": {"type": "string"}, "message": {"type": "string"}}}}}}


def _endpoint(web: Web, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            data = await handler(web, request)
        except TaskboxError as exc:
            if exc.http_status >= 500:
                log.warning("%s %s failed: %s", request.method, request.url.path, web.service.redactor.text(exc.message))
            return JSON(web.service.redactor(exc.to_dict()), status_code=exc.http_status)
        except (ValueError, TypeError) as exc:
            return error_response(400, "invalid_input", str(exc).splitlines()[0][:300] if str(exc) else "invalid input")
        except Exception as exc:  # noqa: BLE001 - one line, never a traceback, and the server keeps serving
            log.warning("internal error in %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            return error_response(500, "internal_error", f"internal error in taskbox ({type(exc).__name__}: "
                                                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
        return JSON(web.service.redactor(data) if web.service.redactor.active else data)

    endpoint.__name__ = handler.__name__
    return endpoint


# --- the application -------------------------------------------------------------------------------


def create_app(service: TaskService, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
               allow_origins: Iterable[str] = (), housekeeping: bool = True, mcp: bool = True) -> ASGIApp:
    """The whole web service as one ASGI application over ``service``.

    A non-loopback ``host`` without a ``token`` is refused (:class:`InvalidInput`).
    ``housekeeping`` runs the service's pressure sampling and idle pause while it serves.
    """
    access = Access(host, port, token, frozenset(allow_origins))
    if token:
        service.redactor.add({"taskbox-serve-token": token})  # never in a record, an event or a page
    web = Web(service, access)
    routes: list[BaseRoute] = [Route(r.path, _endpoint(web, r.handler), methods=[r.method]) for r in ROUTES]

    async def events_ws(ws: WebSocket) -> None:
        await web.hub.stream(ws)

    async def metrics(request: Request) -> Response:
        body = await web.call(lambda: generate_latest(web.metrics_registry))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def api_missing(request: Request) -> Response:
        return error_response(404, "not_found", f"no API route {request.method} {request.url.path}")

    routes += [WebSocketRoute("/api/events", events_ws), Route("/metrics", metrics),
               Route("/", index), Route("/task/{task_id}", index),
               Route("/api/{rest:path}", api_missing, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])]
    mcp_app: Starlette | None = None
    if mcp:
        from mcp.server.transport_security import TransportSecuritySettings

        from .mcp_server import create_server

        security = None if is_loopback(host) else TransportSecuritySettings(enable_dns_rebinding_protection=False)
        mcp_app = create_server(service).streamable_http_app(streamable_http_path="/mcp", host=host,
                                                             transport_security=security)
        routes += list(mcp_app.routes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if housekeeping:
                stack.enter_context(service.housekeeping())
            if mcp_app is not None:
                await stack.enter_async_context(mcp_app.router.lifespan_context(mcp_app))
            async with anyio.create_task_group() as tg:
                tg.start_soon(web.hub.run)
                yield
                tg.cancel_scope.cancel()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.web = web
    return Guard(app, access)


def make_server(service: TaskService, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                allow_origins: Iterable[str] = (), housekeeping: bool = True, mcp: bool = True) -> Any:
    """A uvicorn server for :func:`create_app` (call ``.run()``, or ``.serve()`` in a loop)."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise InvalidInput(f"port {port} is not between 0 and 65535")
    app = create_app(service, host=host, port=port, token=token, allow_origins=allow_origins,
                     housekeeping=housekeeping, mcp=mcp)
    # No access log: a dashboard login URL carries the token in its query.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            ws_max_size=64 * 1024, ws="websockets-sansio", lifespan="on")
    return uvicorn.Server(config)


def serve(service: TaskService, host: str = "127.0.0.1", port: int = 8765, *, allow_origins: Iterable[str] = (),
          ready: Callable[[str, str | None], None] | None = None) -> None:
    """Run the web service until interrupted. A non-loopback ``host`` makes or loads the token."""
    token = None if is_loopback(host) else load_token(service.paths.home)
    server = make_server(service, host, port, token=token, allow_origins=allow_origins)
    if ready is not None:
        shown = f"[{host}]" if ":" in host else host
        ready(f"http://{shown}:{port}/", str(service.paths.home / TOKEN_FILE) if token else None)
    server.run()
