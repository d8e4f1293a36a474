"""A real `taskbox serve` application on a loopback port, for the web tests and the benchmark."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from taskbox import web
from taskbox.service import TaskService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(svc: TaskService, *, host: str = "127.0.0.1", token: str | None = None, **kw: Any) -> Iterator[str]:
    """Serve ``svc`` with uvicorn in a thread; yield the base URL (always a loopback address)."""
    port = free_port()
    server = web.make_server(svc, host, port, token=token, housekeeping=False, **kw)
    thread = threading.Thread(target=server.run, name="taskbox-serve-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the web server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
