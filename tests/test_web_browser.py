"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): live updates, a command's output while it runs, restoring a checkpoint, hostile
workspace content rendered inert, and no console errors. Screenshots go to
``$TASKBOX_ARTIFACTS`` (default ``artifacts/``, ignored by git) for CI to keep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from taskbox.service import TaskService

from .conftest import run_cli
from .webserver import running

pytestmark = pytest.mark.docker

ARTIFACTS = Path(os.environ.get("TASKBOX_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
XSS = ['<script>window.__xss = 1; alert(1)</script>', '"><img src=x onerror="window.__xss=2;alert(2)">',
       "<svg onload=alert(3)>"]


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(f"none of {names} is installed (scripts/setup installs chromium and chromium-driver)")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = _binary("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1366,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(_binary("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: webdriver.Chrome, condition: object, timeout: float = 60) -> object:
    # The dashboard redraws as events arrive: an element found a moment ago may be replaced.
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException)).until(condition)  # type: ignore[arg-type]


def text_of(driver: webdriver.Chrome, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def console_errors(driver: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver: webdriver.Chrome, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def no_alert(driver: webdriver.Chrome) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - reading it is the check


def test_dashboard_is_live_and_restores_a_checkpoint(svc: TaskService, repo: Path, browser: webdriver.Chrome) -> None:
    with running(svc) as base:
        browser.get(base + "/")
        wait(browser, lambda d: "No tasks yet" in text_of(d, "#task-rows"))
        wait(browser, lambda d: text_of(d, "#conn") == "live")
        # A task created by another process appears without a reload.
        proc = run_cli("create-task", "live dashboard task", "--repo", str(repo), "--id", "live", "--no-attach",
                       "--agent", "claude", env={"TASKBOX_HOME": str(svc.paths.home)})
        assert proc.returncode == 0, proc.stderr
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-task="live"]'))
        wait(browser, lambda d: "active" in d.find_element(By.CSS_SELECTOR, 'tr[data-task="live"]').text)
        assert "claude" in browser.find_element(By.CSS_SELECTOR, 'tr[data-task="live"]').text
        wait(browser, lambda d: "B (" in d.find_element(By.CSS_SELECTOR, 'tr[data-task="live"]').text, 20)
        screenshot(browser, "dashboard-tasks")

        # Its page: a command's output shows while the command still runs.
        browser.find_element(By.CSS_SELECTOR, 'a[href="/task/live"]').click()
        wait(browser, lambda d: "live dashboard task" in text_of(d, "#task-head"))
        wait(browser, lambda d: "Goal" in text_of(d, "#plan-body"))
        box = browser.find_element(By.ID, "command")
        box.send_keys("for i in 1 2 3 4 5 6 7 8; do echo tick-$i; sleep 1; done")
        browser.find_element(By.ID, "run").click()
        wait(browser, lambda d: "tick-2" in text_of(d, "#live-output"), 30)
        assert "tick-8" not in text_of(browser, "#live-output")  # it is still running: live, not at the end
        assert text_of(browser, "#live-command").startswith("Running")
        wait(browser, lambda d: text_of(d, "#live-command").startswith("Exited 0"), 30)
        assert "tick-8" in text_of(browser, "#live-output")

        # Checkpoints: take one from the page, change the workspace, restore from the page.
        browser.find_element(By.ID, "checkpoint-name").send_keys("page-cp")
        browser.find_element(By.ID, "create-checkpoint").click()
        wait(browser, lambda d: "page-cp" in text_of(d, "#checkpoint-rows"), 60)
        svc.exec("live", "echo broken > app.py; touch junk.txt")
        cp = next(c for c in svc.list_checkpoints("live") if c["name"] == "page-cp")
        css = f'button[data-restore="{cp["checkpoint_id"]}"]'
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#checkpoint-rows tr")) == 2)  # + the risky one
        browser.find_element(By.CSS_SELECTOR, f'button[data-diff="{cp["checkpoint_id"]}"]').click()
        wait(browser, lambda d: "junk.txt" in text_of(d, "#checkpoint-changes"), 60)
        assert "app.py" in text_of(browser, "#checkpoint-changes")
        browser.find_element(By.CSS_SELECTOR, css).click()
        wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, css).text == "Confirm restore")
        browser.find_element(By.CSS_SELECTOR, css).click()
        wait(browser, lambda d: d.find_elements(By.ID, "restore-done"), 60)
        assert svc.read_file("live", "app.py") == b"print('hello')\n"
        assert "junk.txt" not in [e["path"] for e in svc.list_files("live")["entries"]]
        wait(browser, lambda d: "checkpoint.restored" in text_of(d, "#event-list"), 20)
        browser.find_element(By.ID, "load-diff").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#diff-body pre.diff, #diff-body p"), 60)
        screenshot(browser, "dashboard-task")
        assert console_errors(browser) == []


def test_hostile_workspace_content_renders_inert(svc: TaskService, repo: Path, browser: webdriver.Chrome) -> None:
    task = svc.create_task(repo, "xss " + XSS[1], task_id="xss", title="title " + XSS[0])
    plan = "# Plan " + XSS[0] + "\n\n" + "\n".join(f"- [ ] {x}\n\n{x}\n\n| a | {x} |\n|---|---|\n| `{x}` | [link](javascript:alert(9)) |"
                                                  for x in XSS)
    svc.write_file(task.id, "Plan.md", plan.encode())
    svc.update_todos(task.id, [{"id": "t1", "text": "todo " + XSS[1]}])
    svc.log_decision(task.id, "decide " + XSS[0])
    svc.exec(task.id, "touch '\"><img src=x onerror=alert(5)>.txt' && echo '<script>alert(6)</script>' > x.html")
    with running(svc) as base:
        browser.get(base + "/")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-task="xss"]'))
        browser.get(base + "/task/xss")
        wait(browser, lambda d: "Plan" in text_of(d, "#plan-body"))
        browser.find_element(By.ID, "command").send_keys("echo '<img src=x onerror=alert(7)>'; ls")
        browser.find_element(By.ID, "run").click()
        wait(browser, lambda d: text_of(d, "#live-command").startswith("Exited"), 30)
        browser.find_element(By.ID, "load-diff").click()
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#diff-body pre.diff"), 60)
        wait(browser, lambda d: "decision.logged" in text_of(d, "#event-list") or True, 5)
        screenshot(browser, "dashboard-hostile")

        no_alert(browser)
        assert browser.execute_script("return window.__xss") is None
        injected = browser.execute_script(
            "return document.querySelectorAll('main script, main img, main svg, main iframe, main [onerror], "
            "main [onload], main a[href^=javascript]').length")
        assert injected == 0
        # The hostile text is shown, as text.
        assert "<script>window.__xss = 1; alert(1)</script>" in text_of(browser, "#plan-body")
        assert "<script>" in text_of(browser, "#task-head")
        assert "onerror=alert(7)" in text_of(browser, "#live-output")
        assert "onerror=alert(5)" in text_of(browser, "#diff-body")
        assert "onerror" in text_of(browser, "#todo-list")
        browser.get(base + "/")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-task="xss"]'))
        no_alert(browser)
        assert browser.execute_script("return document.querySelectorAll('main img, main script').length") == 0
        assert console_errors(browser) == []


def test_a_command_run_by_the_cli_streams_to_the_task_page_as_text(svc: TaskService, repo: Path,
                                                                    browser: webdriver.Chrome) -> None:
    svc.create_task(repo, "cli output task", task_id="cliout")
    with running(svc) as base:
        browser.get(base + "/task/cliout")
        wait(browser, lambda d: "cli output task" in text_of(d, "#task-head"))
        wait(browser, lambda d: text_of(d, "#conn") == "live")
        # Another process runs it; hostile output, printed while the command is still running.
        script = ("echo '" + XSS[0] + "'; echo '" + XSS[1] + "' >&2; for i in 1 2 3 4 5 6 7 8 9 10; do "
                  "echo cli-tick-$i; sleep 0.5; done; exit 3")
        proc = subprocess.Popen([sys.executable, "-m", "taskbox", "exec", "cliout", "--", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TASKBOX_HOME": str(svc.paths.home)})
        try:
            wait(browser, lambda d: "cli-tick-2" in text_of(d, "#live-output"), 30)
            assert proc.poll() is None  # live: the command is still running
            assert text_of(browser, "#live-command").startswith("Running: sh -c")
            assert XSS[0] in text_of(browser, "#live-output") and XSS[1] in text_of(browser, "#live-output")
            wait(browser, lambda d: text_of(d, "#live-command").startswith("Exited 3"), 30)
            assert "cli-tick-10" in text_of(browser, "#live-output")
            assert proc.wait(30) == 3
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        screenshot(browser, "dashboard-cli-output")
        no_alert(browser)
        assert browser.execute_script("return window.__xss") is None
        assert browser.execute_script(
            "return document.querySelectorAll('#live-output *:not(span), main script, main img, main svg:not(.edges), "
            "main [onerror], main [onload]').length") == 0
        wait(browser, lambda d: "task.exec" in text_of(d, "#event-list"), 20)
        assert "exec.output" not in text_of(browser, "#event-list")  # the command log has them
        # Todos from another process appear, and change, without a reload (and Plan.md with them).
        env = {"TASKBOX_HOME": str(svc.paths.home)}
        assert run_cli("todo", "cliout", "--add", "write the parser", env=env).returncode == 0
        wait(browser, lambda d: "☐ write the parser" in text_of(d, "#todo-list"), 20)
        wait(browser, lambda d: "write the parser" in text_of(d, "#plan-body"), 20)
        assert run_cli("todo", "cliout", "--done", "t1", env=env).returncode == 0
        wait(browser, lambda d: "☑ write the parser" in text_of(d, "#todo-list"), 20)
        # A page opened later shows the last command's output from the log, and the newest
        # events, however many came since.
        for i in range(300):
            svc.registry.add_event("decision.logged", "cliout", {"decision": f"later-{i}"}, limited=False)
        browser.get(base + "/task/cliout")
        wait(browser, lambda d: "cli-tick-10" in text_of(d, "#live-output"), 30)
        assert text_of(browser, "#live-command").startswith("Exited 3")
        wait(browser, lambda d: "later-299" in text_of(d, "#event-list"), 30)
        first = browser.find_element(By.CSS_SELECTOR, "#event-list li").text
        assert "later-299" in first  # newest first
        assert console_errors(browser) == []


DIAMOND = """
parallel = 2
[[subtask]]
id = "a"
title = "base file"
command = "sleep 2; echo a > a.txt"
[[subtask]]
id = "b"
title = "b on a"
command = "test -f a.txt && sleep 3 && echo b > b.txt"
depends_on = ["a"]
[[subtask]]
id = "c"
title = "c on a"
command = "test -f a.txt && sleep 3 && echo c > c.txt"
depends_on = ["a"]
[[subtask]]
id = "d"
title = "d on b and c"
command = "cat a.txt b.txt c.txt > d.txt"
depends_on = ["b", "c"]
"""


def test_the_subtask_graph_of_a_real_ultrawork_run_is_live(svc: TaskService, repo: Path, tmp_path: Path,
                                                            browser: webdriver.Chrome) -> None:
    parent = svc.create_task(repo, "diamond parent", task_id="diamond")
    plan = tmp_path / "plan.toml"
    plan.write_text(DIAMOND)
    with running(svc) as base:
        browser.get(base + "/task/diamond")
        wait(browser, lambda d: "diamond parent" in text_of(d, "#task-head"))
        wait(browser, lambda d: text_of(d, "#conn") == "live")
        assert not browser.find_element(By.ID, "subtasks").is_displayed()  # no sub-tasks yet
        proc = subprocess.Popen([sys.executable, "-m", "taskbox", "ultrawork", parent.id, "--plan", str(plan)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TASKBOX_HOME": str(svc.paths.home)})
        statuses: dict[str, set[str]] = {k: set() for k in "abcd"}

        def status_of(d: webdriver.Chrome) -> dict[str, str]:
            got = d.execute_script("return Array.from(document.querySelectorAll('#subtask-graph [data-subtask]'))"
                                   ".map(n => [n.dataset.subtask, n.dataset.status])")
            now = {k: v for k, v in got}
            for k, v in now.items():
                statuses.setdefault(k, set()).add(v)
            return now

        try:
            # The graph appears without a reload: four nodes in three stages, four arrows.
            wait(browser, lambda d: len(status_of(d)) == 4, 120)
            cols = browser.execute_script("return Array.from(document.querySelectorAll('#subtask-graph .col'))"
                                          ".map(c => Array.from(c.querySelectorAll('[data-subtask]'))"
                                          ".map(n => n.dataset.subtask))")
            assert [sorted(c) for c in cols] == [["a"], ["b", "c"], ["d"]]
            edges = browser.execute_script("return Array.from(document.querySelectorAll('#subtask-graph path.edge'))"
                                           ".map(e => e.getAttribute('data-edge'))")
            assert sorted(edges) == ["a->b", "a->c", "b->d", "c->d"]
            # Statuses change live as the run goes on (polled here as a person would watch them).
            wait(browser, lambda d: status_of(d).get("b") == "running" or "merged" in statuses["b"], 180)
            wait(browser, lambda d: set(status_of(d).values()) == {"merged"}, 300)
            assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert "running" in statuses["a"] and "running" in statuses["b"]  # seen mid-run, not only at the end
        assert "4/4 finished" in text_of(browser, "#subtask-progress")
        status = httpx.get(base + "/api/tasks/diamond/subtasks", timeout=30).json()
        assert status["merged"] == 4 and [s["id"] for s in status["subtasks"]] == ["a", "b", "c", "d"]
        # Arrows join the nodes they name: each starts at its source's right edge, ends at its target's left.
        geometry = browser.execute_script("""
            const box = document.querySelector('#subtask-graph .graph').getBoundingClientRect();
            return Array.from(document.querySelectorAll('#subtask-graph path.edge')).map(e => {
              const [from, to] = e.getAttribute('data-edge').split('->');
              const a = document.querySelector('[data-subtask="' + from + '"]').getBoundingClientRect();
              const b = document.querySelector('[data-subtask="' + to + '"]').getBoundingClientRect();
              const len = e.getTotalLength(), p0 = e.getPointAtLength(0), p1 = e.getPointAtLength(len);
              return [p0.x + box.left - a.right, p1.x + box.left - b.left, len];
            });""")
        for start_gap, end_gap, length in geometry:
            assert abs(start_gap) < 2 and abs(end_gap) < 2 and length > 10
        # A node links to its child task's page.
        child = svc.registry.subtask(parent.id, "d")["task_id"]
        assert browser.find_element(By.CSS_SELECTOR, '[data-subtask="d"] a').get_attribute("href").endswith(
            "/task/" + child)
        screenshot(browser, "dashboard-subtask-graph")
        browser.find_element(By.ID, "subtasks").screenshot(str(ARTIFACTS / "dashboard-subtask-graph-card.png"))
        assert console_errors(browser) == []


def test_the_dashboard_works_from_the_keyboard(svc: TaskService, repo: Path, browser: webdriver.Chrome) -> None:
    svc.create_task(repo, "keyboard task", task_id="keys")
    svc.create_checkpoint("keys", "kb-cp")
    with running(svc) as base:
        browser.get(base + "/")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-task="keys"]'))
        body = browser.find_element(By.TAG_NAME, "body")

        def tab_through(limit: int = 80) -> list[dict[str, Any]]:
            seen: list[dict[str, Any]] = []
            for _ in range(limit):
                body.send_keys(Keys.TAB) if not seen else browser.switch_to.active_element.send_keys(Keys.TAB)
                info = browser.execute_script("""
                    const e = document.activeElement, s = getComputedStyle(e);
                    return {tag: e.tagName.toLowerCase(), id: e.id, text: (e.textContent || '').trim().slice(0, 40),
                            href: e.getAttribute('href'), outline: s.outlineStyle, width: s.outlineWidth,
                            visible: e.matches(':focus-visible')};""")
                if info["tag"] == "body" or (seen and info == seen[0]):
                    break  # round the page once
                seen.append(info)
            return seen

        order = tab_through()
        assert order[0]["text"] == "Skip to content"  # the first stop skips the header
        assert [o["tag"] for o in order if o["id"] in ("status-filter", "search")] == ["select", "input"]
        assert any(o["href"] == "/task/keys" for o in order)
        for o in order:  # every stop shows where the focus is
            assert o["visible"] and o["outline"] != "none" and o["width"] != "0px", o
        # Tab to the task's link; a live redraw of the list keeps the focus on it; Enter opens it.
        for _ in range(len(order) + 1):
            browser.switch_to.active_element.send_keys(Keys.TAB)
            if browser.execute_script("return document.activeElement.getAttribute('href')") == "/task/keys":
                break
        browser.execute_script("document.activeElement.__old = true")
        svc.log_decision("keys", "an event redraws the list")
        wait(browser, lambda d: d.execute_script(
            "const a = document.querySelector('a[href=\"/task/keys\"]'); return a && !a.__old"), 30)
        assert browser.execute_script("return document.activeElement.getAttribute('href')") == "/task/keys"
        browser.switch_to.active_element.send_keys(Keys.ENTER)
        wait(browser, lambda d: "keyboard task" in text_of(d, "#task-head"))
        wait(browser, lambda d: "kb-cp" in text_of(d, "#checkpoint-rows"))
        order = tab_through(120)
        ids = [o["id"] for o in order if o["id"]]
        for needed in ("command", "run", "checkpoint-name", "create-checkpoint", "load-diff"):
            assert needed in ids, (needed, ids)
        assert ids.index("command") < ids.index("run") < ids.index("checkpoint-name") < ids.index("create-checkpoint")
        assert any(o["tag"] == "button" and o["text"] == "Restore" for o in order)
        for o in order:
            assert o["visible"] and o["outline"] != "none", o
        # Everything that acts is a real button or link: nothing clickable is a bare element.
        assert browser.execute_script(
            "return document.querySelectorAll('[onclick], [role=button]:not(button), div[tabindex], span[tabindex]')"
            ".length") == 0
        # Run a command with the keyboard alone: type, Enter submits the form.
        box = browser.find_element(By.ID, "command")
        box.send_keys("echo from-the-keyboard | tee -a app.py", Keys.ENTER)
        wait(browser, lambda d: text_of(d, "#live-command").startswith("Exited 0"), 60)
        assert "from-the-keyboard" in text_of(browser, "#live-output")
        # The checkpoint's Diff button, then the branch diff, highlighted line by line.
        browser.find_element(By.CSS_SELECTOR, "button[data-diff]").send_keys(Keys.ENTER)
        wait(browser, lambda d: "app.py" in text_of(d, "#checkpoint-changes"), 60)
        browser.find_element(By.ID, "load-diff").send_keys(Keys.ENTER)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#diff-body pre.diff"), 60)
        wait(browser, lambda d: "+from-the-keyboard" in d.execute_script(
            "return Array.from(document.querySelectorAll('#diff-body pre.diff span.add')).map(e => e.textContent)"), 30)
        assert browser.find_elements(By.CSS_SELECTOR, "#diff-body pre.diff span.file")
        colour = browser.execute_script("return getComputedStyle(document.querySelector('#diff-body span.add'))"
                                        ".backgroundColor")
        assert colour not in ("rgba(0, 0, 0, 0)", "transparent")
        screenshot(browser, "dashboard-keyboard")
        assert console_errors(browser) == []


def test_the_task_list_columns_are_live(svc: TaskService, repo: Path, browser: webdriver.Chrome) -> None:
    svc.create_task(repo, "columns task", task_id="cols")
    env = {"TASKBOX_HOME": str(svc.paths.home)}
    with running(svc) as base:
        browser.get(base + "/")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, 'tr[data-task="cols"]'))
        wait(browser, lambda d: text_of(d, "#conn") == "live")
        headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#tasks thead th")]
        assert headers == ["Task", "Title", "Status", "Agent", "Branch", "CPU", "Memory", "Last activity"]

        def cell(name: str) -> str:
            cells = browser.find_elements(By.CSS_SELECTOR, 'tr[data-task="cols"] td')
            return cells[headers.index(name)].text if cells else ""

        assert cell("Branch") == svc.get("cols").branch and cell("Status") == "active"
        # Each change comes from another process; the row follows without a reload.
        proc = run_cli("resume-task", "cols", "--agent", "opencode", env=env)
        assert proc.returncode == 0, proc.stderr
        wait(browser, lambda d: "opencode" in cell("Agent"), 30)
        proc = run_cli("exec", "cols", "-b", "--", "sh", "-c", "while :; do :; done", env=env)
        assert proc.returncode == 0, proc.stderr
        wait(browser, lambda d: cell("CPU").endswith("%") and float(cell("CPU")[:-1]) >= 20, 60)
        assert "iB (" in cell("Memory")
        before = cell("Last activity")
        wait(browser, lambda d: cell("Last activity") not in ("", before), 30)
        screenshot(browser, "dashboard-tasks-live")
        proc = run_cli("detach", "cols", "--kill-running", env=env)
        assert proc.returncode == 0, proc.stderr
        wait(browser, lambda d: cell("Status") == "paused", 60)
        wait(browser, lambda d: cell("CPU") == "-" and cell("Memory") == "-", 30)
        assert cell("Agent") == svc.get("cols").agent  # nobody attached: the task's own agent
        assert console_errors(browser) == []


def test_pages_of_tasks_in_every_state_load_without_console_errors(svc: TaskService, repo: Path,
                                                                    browser: webdriver.Chrome) -> None:
    svc.create_task(repo, "never started", task_id="st-pending", lazy=True)
    svc.create_task(repo, "finished", task_id="st-done")
    svc.complete("st-done", "all done")
    svc.create_task(repo, "given up", task_id="st-aborted", lazy=True)
    svc.abort("st-aborted", "not needed")
    svc.create_task(repo, "cleaned up", task_id="st-clean")
    svc.complete("st-clean", "done", cleanup=True)
    with running(svc) as base:
        browser.get(base + "/")
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-task]")) == 4)
        for tid in ("st-pending", "st-done", "st-aborted", "st-clean"):
            browser.get(base + "/task/" + tid)
            title = svc.get(tid).title
            wait(browser, lambda d, title=title: title in text_of(d, "#task-head"))
            wait(browser, lambda d: "Loading" not in text_of(d, "#plan-body"))
            browser.find_element(By.ID, "load-diff").click()
            wait(browser, lambda d: "Loading" not in text_of(d, "#diff-body"), 60)
            assert console_errors(browser) == [], tid
        screenshot(browser, "dashboard-finished-task")
