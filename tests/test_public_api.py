"""The package root's public names, and the hook system's contract."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import taskbox
from taskbox import hookspecs
from taskbox.plugins import DEFAULT_PLUGINS, make_manager


def test_all_is_exactly_the_public_names() -> None:
    public = {n for n in dir(taskbox) if not n.startswith("_") and not inspect.ismodule(getattr(taskbox, n))}
    assert set(taskbox.__all__) - {"__version__"} == public
    for name in taskbox.__all__:
        assert hasattr(taskbox, name)


def documented_tree() -> dict[str, tuple[str | None, int]]:
    """The tree in taskbox.errors' docstring: each class's documented parent and exit code."""
    out: dict[str, tuple[str | None, int]] = {}
    parents: list[str] = []
    for line in (taskbox.errors.__doc__ or "").splitlines():
        m = re.match(r"^    ((?:[│ ]   )*)(?:[├└]── )?(\w+)\s+exit (\d+)", line)
        if not m:
            continue
        depth = len(m.group(1)) // 4 + (1 if ("├" in line or "└" in line) else 0)
        parents[depth:] = [m.group(2)]
        out[m.group(2)] = (parents[depth - 1] if depth else None, int(m.group(3)))
    return out


def test_the_error_tree_is_exported_documented_and_true() -> None:
    # Every exception class in taskbox.errors, found by class, not by name.
    classes = {n: c for n, c in inspect.getmembers(taskbox.errors, inspect.isclass)
               if issubclass(c, taskbox.TaskboxError) and c.__module__ == "taskbox.errors"}
    assert {"PolicyDenied", "UnsafeArchive", "TaskNotFound", "WorkspaceFull"} <= set(classes)
    tree = documented_tree()
    assert set(tree) == set(classes), "documented tree and classes differ"
    for name, cls in classes.items():
        assert name in taskbox.__all__, f"{name} is not exported from the package root"
        parent, code = tree[name]
        assert cls.exit_code == code, f"{name}: exit {cls.exit_code}, documented {code}"
        assert cls.http_status >= 400
        if parent is not None:
            assert cls.__mro__[1].__name__ == parent, f"{name} derives from {cls.__mro__[1].__name__}, not {parent}"


def test_every_hook_has_a_docstring_and_docs() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "hooks.md").read_text()
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "taskbox_spec")]
    assert {"session_start", "session_end", "task_start", "task_complete", "pre_tool_call", "post_tool_call",
            "todo_complete", "tick"} <= set(specs)
    for name in specs:
        assert getattr(hookspecs, name).__doc__, name
        assert f"`{name}`" in docs, f"hook {name} is not documented in docs/hooks.md"


def test_default_plugins_use_the_same_specs() -> None:
    pm = make_manager(load_entrypoints=False)
    for name in DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None
    pm.check_pending()  # every implementation matches a declared hookspec


def test_third_party_plugin_loads_from_entry_point_and_can_refuse_a_tool(
        tmp_path: Path, svc, repo: Path) -> None:
    """A real installed distribution with a `taskbox` entry point refuses `rm` commands."""
    site = tmp_path / "site"
    (site / "noremove").mkdir(parents=True)
    (site / "noremove" / "__init__.py").write_text(textwrap.dedent('''
        from taskbox import hookimpl, InvalidInput

        @hookimpl
        def pre_tool_call(service, task, tool, args):
            if tool == "exec" and "rm " in str(args["command"]):
                raise InvalidInput("noremove plugin: rm is not allowed here")
    '''))
    dist = site / "noremove-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: noremove\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[taskbox]\nnoremove = noremove\n")
    task = svc.create_task(repo, "plugin test")
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(site)!r})
        from taskbox import TaskService, InvalidInput
        s = TaskService({str(svc.paths.home)!r})
        assert "noremove" in [n for n, _ in s.pm.list_name_plugin()]
        assert s.exec({task.id!r}, "echo ok").stdout == "ok\\n"
        try:
            s.exec({task.id!r}, "rm README.md")
        except InvalidInput as e:
            print("refused:", e.message)
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: noremove plugin" in out.stdout
    assert (Path(task.workspace_path) / "README.md").exists()
