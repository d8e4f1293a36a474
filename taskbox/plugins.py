"""The plugin manager: built-in default plugins plus third-party ``taskbox`` entry points."""

from __future__ import annotations

import importlib
import os

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "taskbox.default_plugins.branch",
    "taskbox.default_plugins.plan",
    "taskbox.default_plugins.idle",
    "taskbox.default_plugins.autocheckpoint",
    "taskbox.default_plugins.safety",
)


def make_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the default plugins and (unless disabled) installed plugins.

    ``TASKBOX_NO_PLUGINS=1`` skips third-party plugins, e.g. to rule one out when debugging.
    """
    pm = pluggy.PluginManager("taskbox")
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    if load_entrypoints and not os.environ.get("TASKBOX_NO_PLUGINS"):
        pm.load_setuptools_entrypoints("taskbox")
    return pm
