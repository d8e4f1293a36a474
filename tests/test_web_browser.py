"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): live updates, a command's output while it runs, restoring a checkpoint, hostile
workspace content rendered inert, and no console errors. Screenshots go to
``$TASKBOX_ARTIFACTS`` (default ``artifacts/``, ignored by git) for CI to keep."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
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
