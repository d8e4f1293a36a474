"""Crash points for tests: ``TASKBOX_CRASH_AT=<name>`` kills the process there with SIGKILL.

This is how the test suite proves that a process killed in the middle of a create or a
complete leaves state that `taskbox doctor` can repair. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("TASKBOX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
