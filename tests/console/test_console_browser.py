"""The web console in a real browser (headless Chromium through selenium) against an
in-process gateway and simulator: logging in as admin and as a user, users admin,
the charts against the API, the streaming playground and its Stop, and hostile text
shown as text. One browser for the module; every wait is on a condition.

Screenshots of the main views go to a temporary folder (printed; not committed)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import trio

from gateway_stack import Stack, start_stack
from ollama_proxy.access.keys import key_prefix
from ollama_proxy.sim.models import DEFAULT_MODELS
from ollama_proxy.sim.server import Simulator
from ollama_proxy.store import db

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 10
HOSTILE = "<img src=x onerror=window.__xss=1>"
HOSTILE_MODEL = dataclasses.replace(DEFAULT_MODELS[0], name="evil" + HOSTILE + ":latest")


def find_browser() -> tuple[str, str] | None:
    """Chromium and its driver, or None."""
    binary = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                         "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium with chromedriver found "
                                "(apt-get install chromium chromium-driver)")


class LiveStack:
    """A gateway and its simulator run by trio in a thread, for the sync browser tests."""

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            sim = Simulator(models=(*DEFAULT_MODELS, HOSTILE_MODEL))
            self.stack = await start_stack(nursery, sim)
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def start(self) -> Stack:
        self._thread.start()
        assert self._ready.wait(30), "the gateway did not start"
        if self._error is not None:
            raise self._error
        assert self.stack is not None
        return self.stack

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` in the trio thread (to read the simulator's records safely)."""
        return trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self) -> None:
        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveStack]:
    live = LiveStack()
    live.start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert BROWSER is not None
    binary, driver_path = BROWSER
    profile = tempfile.mkdtemp(prefix="console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": profile})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots() -> str:
    folder = tempfile.mkdtemp(prefix="console-screenshots-")
    print(f"console screenshots: {folder}")
    return folder


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = WAIT_S) -> Any:
    def safe(d: Any) -> Any:
        try:
            return condition(d)
        except StaleElementReferenceException:  # a view redrawn under us: ask again
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(safe)


def text_of(driver: Any, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found and found[0].is_displayed() else ""


def login(driver: Any, stack: Stack, key: str) -> None:
    driver.get(stack.url + "/health")  # same origin, no script that could log in again
    driver.execute_script("sessionStorage.clear()")
    driver.get(stack.url + "/admin")
    field = wait(driver, lambda d: d.find_element(By.ID, "login-key").is_displayed()
                 and d.find_element(By.ID, "login-key"))
    field.send_keys(key)
    driver.find_element(By.ID, "login-button").click()
    wait(driver, lambda d: text_of(d, "#who"))


def open_view(driver: Any, name: str, ready_css: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#nav button[data-view="{name}"]').click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#view-{name} {ready_css}"))


def bars(driver: Any, chart_id: str) -> dict[str, float]:
    return {b.get_attribute("data-label"): float(b.get_attribute("data-value"))
            for b in driver.find_elements(By.CSS_SELECTOR, f"#{chart_id} rect.bar")}


def user_row(driver: Any, name: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f'#users-table tr[data-user="{name}"]')


def new_user(stack: Stack, name: str, **limits: Any) -> str:
    response = httpx.post(stack.url + "/admin/api/users", headers=stack.headers,
                          json={"name": name, "limits": limits}, timeout=5)
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def chat(stack: Stack, key: str, content: str) -> None:
    """One request as the owner of ``key``, waited for until its ledger row is in."""
    headers = {"Authorization": f"Bearer {key}"}
    before = sum(r["requests"] for r in own_usage(stack, key))
    response = httpx.post(stack.url + "/v1/chat/completions", timeout=10, headers=headers,
                          json={"model": "llama3.2", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    WebDriverWait(None, WAIT_S, poll_frequency=0.02).until(
        lambda _: sum(r["requests"] for r in own_usage(stack, key)) > before)


def own_usage(stack: Stack, key: str) -> list[dict[str, Any]]:
    response = httpx.get(stack.url + "/v1/usage?group_by=day",
                         headers={"Authorization": f"Bearer {key}"}, timeout=5)
    rows: list[dict[str, Any]] = response.json()["rows"]
    return rows


def ask_as_new_user(live: LiveStack, browser: Any, name: str, prompt: str) -> Stack:
    """Log in as a new user ``name`` and send ``prompt`` in the playground."""
    stack = live.stack
    assert stack is not None
    login(browser, stack, new_user(stack, name))
    open_view(browser, "playground", "#pg-model option")
    browser.find_element(By.ID, "pg-prompt").send_keys(prompt)
    browser.find_element(By.ID, "pg-send").click()
    return stack


def no_script_ran(driver: Any) -> None:
    assert driver.execute_script("return window.__xss === undefined")
    assert driver.find_elements(By.TAG_NAME, "img") == []


def test_admin_creates_a_user_sets_a_limit_suspends_and_resumes(live: LiveStack, browser: Any,
                                                                shots: str) -> None:
    stack = live.stack
    assert stack is not None
    login(browser, stack, stack.key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ov-7d") and text_of(d, "#ov-queued"))
    browser.save_screenshot(os.path.join(shots, "overview.png"))
    open_view(browser, "users", "#users-table")
    browser.find_element(By.ID, "new-user-name").send_keys("carol")
    browser.find_element(By.CSS_SELECTOR, "#new-user-form button[type=submit]").click()
    key = wait(browser, lambda d: text_of(d, "#secret-key"))
    me = httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert me.status_code == 200 and me.json()["name"] == "carol"
    browser.save_screenshot(os.path.join(shots, "users.png"))
    # A limit the API refuses: its message is shown; then one it takes, shown in the table.
    user_row(browser, "carol").find_element(By.CSS_SELECTOR, '[data-action="limits"]').click()
    field = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#limits-form [name="max_concurrent"]'))
    field.send_keys("-5")
    browser.find_element(By.CSS_SELECTOR, "#limits-form button[type=submit]").click()
    assert "max_concurrent" in wait(browser, lambda d: text_of(d, "#limits-error"))
    field.clear()
    browser.find_element(By.CSS_SELECTOR, '#limits-form [name="requests_per_day"]').send_keys("12345")
    browser.find_element(By.CSS_SELECTOR, "#limits-form button[type=submit]").click()
    wait(browser, lambda d: "requests_per_day=12345" in user_row(d, "carol").text)
    assert httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).json()["limits"]["requests_per_day"] == 12345
    # Suspend and resume.
    user_row(browser, "carol").find_element(By.CSS_SELECTOR, '[data-action="suspend"]').click()
    wait(browser, lambda d: "suspended" in user_row(d, "carol").text)
    assert httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).status_code == 403
    user_row(browser, "carol").find_element(By.CSS_SELECTOR, '[data-action="resume"]').click()
    wait(browser, lambda d: "active" in user_row(d, "carol").text)
    assert httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).status_code == 200


def test_the_charts_match_the_usage_api(live: LiveStack, browser: Any, shots: str) -> None:
    stack = live.stack
    assert stack is not None
    key = new_user(stack, "dave")
    for n in (3, 5, 7):
        chat(stack, key, f"hello [[sim:tokens={n}]]")
    login(browser, stack, stack.key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ov-7d rect.bar"))
    since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=6)).date()
    rows = httpx.get(stack.url + f"/admin/api/usage?group_by=day&since={since}",
                     headers=stack.headers, timeout=5).json()["rows"]
    shown = {k: v for k, v in bars(browser, "ov-7d").items() if v}
    assert shown == {r["key"]: r["requests"] for r in rows if r["requests"]}
    assert sum(shown.values()) >= 3
    # The user's own chart: tokens per day, as /v1/usage says.
    login(browser, stack, key)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#me-usage-chart rect.bar"))
    mine = own_usage(stack, key)
    shown = {k: v for k, v in bars(browser, "me-usage-chart").items() if v}
    assert shown == {r["key"]: r["prompt_tokens"] + r["completion_tokens"] for r in mine}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#me-usage-chart rect.bar")) == 30


def test_a_user_sees_only_their_own_data_on_a_phone_in_either_theme(live: LiveStack, browser: Any,
                                                        shots: str) -> None:
    stack = live.stack
    assert stack is not None
    key = new_user(stack, "erin", requests_per_day=50)
    chat(stack, key, "hi [[sim:tokens=4]]")
    chat(stack, new_user(stack, "frank"), "hi [[sim:tokens=9]]")
    browser.set_window_size(360, 800)
    try:
        login(browser, stack, key)
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#me-usage-table td"))
        visible = [b.get_attribute("data-view")
                   for b in browser.find_elements(By.CSS_SELECTOR, "#nav button") if b.is_displayed()]
        assert visible == ["me", "playground"]
        assert text_of(browser, "#me-name") == "erin"
        assert text_of(browser, "#who") == "erin (user)"
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#me-usage-table tbody td")]
        assert cells[1:4] == ["1", str(own_usage(stack, key)[0]["prompt_tokens"]), "4"]
        assert "50" in text_of(browser, "#me-limits")
        own_keys = text_of(browser, "#me-keys")
        assert key_prefix(key) in own_keys and "active (this one)" in own_keys
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        browser.save_screenshot(os.path.join(shots, "my-usage-360px.png"))
        for scheme, background in (("dark", "rgb(20, 23, 28)"), ("light", "rgb(255, 255, 255)")):
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {
                "features": [{"name": "prefers-color-scheme", "value": scheme}]})
            assert browser.execute_script(
                "return getComputedStyle(document.body).backgroundColor") == background
        browser.refresh()  # the key is kept for the tab
        wait(browser, lambda d: text_of(d, "#who") == "erin (user)")
        assert browser.execute_script(f"return sessionStorage.getItem('ollama-proxy-key') === '{key}'")
    finally:
        browser.set_window_size(1200, 900)


def test_the_playground_streams_an_answer_and_shows_its_usage(live: LiveStack, browser: Any,
                                                              shots: str) -> None:
    ask_as_new_user(live, browser, "gina", "tell me [[sim:tokens=12]]")
    stats = wait(browser, lambda d: "completion tokens" in text_of(d, "#pg-stats")
                 and d.find_element(By.ID, "pg-stats"))
    usage = json.loads(stats.get_attribute("data-usage"))
    assert usage["completion_tokens"] == 12
    assert "tokens/s" in stats.text
    answers = browser.find_elements(By.CSS_SELECTOR, "#pg-chat .msg.assistant")
    assert len(answers) == 1 and answers[0].text.strip()
    browser.save_screenshot(os.path.join(shots, "playground.png"))


def test_stop_cancels_the_stream_at_the_backend(live: LiveStack, browser: Any) -> None:
    stack = ask_as_new_user(live, browser, "hank", "slowly [[sim:rate=20]] [[sim:tokens=2000]]")
    wait(browser, lambda d: "tokens/s" in text_of(d, "#pg-stats")
         and text_of(d, "#pg-chat .msg.assistant"))  # tokens are arriving
    browser.find_element(By.ID, "pg-stop").click()
    wait(browser, lambda d: text_of(d, "#pg-stats") == "stopped")

    def cancelled(_: Any) -> bool:
        records = live.call(lambda: [r for r in stack.sim.records
                                     if r.body and "slowly" in json.dumps(r.body)])
        return len(records) == 1 and records[0].outcome == "cancelled"
    wait(browser, cancelled)
    assert browser.find_element(By.ID, "pg-send").is_enabled()


def test_hostile_names_and_messages_render_as_text(live: LiveStack, browser: Any) -> None:
    stack = live.stack
    assert stack is not None
    login(browser, stack, stack.key)
    # A user name the API refuses (it says which characters it takes).
    open_view(browser, "users", "#users-table")
    browser.find_element(By.ID, "new-user-name").send_keys("x" + HOSTILE)
    browser.find_element(By.CSS_SELECTOR, "#new-user-form button[type=submit]").click()
    assert "characters" in wait(browser, lambda d: text_of(d, "#users-error"))
    no_script_ran(browser)
    # A user already named so (written straight into the database: the API would refuse).
    conn = db.connect(stack.gateway.config.server.database)
    try:
        with conn:
            conn.execute("INSERT INTO users (name, role, created_at) VALUES (?, 'user', ?)",
                         ("x" + HOSTILE, time.time()))
    finally:
        conn.close()
    open_view(browser, "usage", "#usage-out")
    open_view(browser, "users", "#users-table")
    assert HOSTILE in user_row(browser, "x" + HOSTILE).text
    no_script_ran(browser)
    # A model name, in the playground's list and the backends view.
    open_view(browser, "playground", "#pg-model option")
    names = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#pg-model option")]
    assert any(HOSTILE in n for n in names), names
    open_view(browser, "backends", "#backends-out table")
    assert HOSTILE in text_of(browser, "#backends-out")
    # An error message carrying it: the gateway's 404 for a model that does not exist,
    # named so (put in the list by the test), shown in the playground.
    open_view(browser, "playground", "#pg-model option")
    browser.execute_script("const o = document.createElement('option');"
                           "o.value = o.textContent = arguments[0];"
                           "document.getElementById('pg-model').append(o);"
                           "document.getElementById('pg-model').value = arguments[0];",
                           "nope" + HOSTILE)
    browser.find_element(By.ID, "pg-prompt").send_keys("hello")
    browser.find_element(By.ID, "pg-send").click()
    assert HOSTILE in wait(browser, lambda d: text_of(d, "#pg-error"))
    no_script_ran(browser)


def test_admin_keys_delete_usage_csv_and_audit(live: LiveStack, browser: Any) -> None:
    stack = live.stack
    assert stack is not None
    key = new_user(stack, "ivan")
    chat(stack, key, "hi [[sim:tokens=6]]")
    login(browser, stack, stack.key)
    # A second key, shown once; then revoked.
    open_view(browser, "users", "#users-table")
    user_row(browser, "ivan").find_element(By.CSS_SELECTOR, '[data-action="keys"]').click()
    wait(browser, lambda d: d.find_element(By.ID, "new-key")).click()
    second = wait(browser, lambda d: text_of(d, "#user-detail #secret-key"))
    assert httpx.get(stack.url + "/v1/me", headers={"Authorization": f"Bearer {second}"},
                     timeout=5).json()["name"] == "ivan"
    revoke = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#user-detail button.danger"))
    assert len(revoke) == 2
    revoke[-1].click()
    wait(browser, lambda d: "revoked" in text_of(d, "#user-detail"))
    # Usage by model, and its CSV as the download carries it.
    open_view(browser, "usage", "#usage-out table")
    browser.execute_script("window.__csv = null; const make = URL.createObjectURL;"
                           "URL.createObjectURL = (blob) => { blob.text().then((t) => { window.__csv = t; });"
                           " return make(blob); };")
    Select(browser.find_element(By.ID, "usage-group")).select_by_value("model")
    browser.find_element(By.CSS_SELECTOR, "#usage-form button[type=submit]").click()
    wait(browser, lambda d: "llama3.2" in text_of(d, "#usage-out"))
    browser.find_element(By.ID, "usage-csv").click()
    csv = wait(browser, lambda d: d.execute_script("return window.__csv"))
    since = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=29)).date()
    rows = httpx.get(stack.url + f"/admin/api/usage?group_by=model&since={since}",
                     headers=stack.headers, timeout=5).json()["rows"]
    lines = csv.strip().split("\r\n")
    assert lines[0] == "key,requests,prompt_tokens,completion_tokens,errors,gpu_seconds,load_seconds"
    assert sorted(line.split(",")[:2] for line in lines[1:]) == sorted(
        [r["key"] or "", str(r["requests"])] for r in rows)
    # Delete, confirmed; then the audit log tells it all.
    open_view(browser, "users", "#users-table")
    user_row(browser, "ivan").find_element(By.CSS_SELECTOR, '[data-action="delete"]').click()
    alert = wait(browser, lambda d: d.switch_to.alert)
    assert "ivan" in alert.text
    alert.accept()
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, '#users-table tr[data-user="ivan"]'))
    open_view(browser, "audit", "table")
    audit = text_of(browser, "#view-audit")
    for action in ("user.create", "key.create", "key.revoke", "user.delete"):
        assert action in audit, action


def test_the_overview_shows_a_request_in_flight_as_it_runs(live: LiveStack, browser: Any) -> None:
    stack = live.stack
    assert stack is not None
    key = new_user(stack, "judy")
    login(browser, stack, stack.key)
    wait(browser, lambda d: text_of(d, "#ov-in-flight") == "0")
    streaming, done = threading.Event(), threading.Event()

    def slow_stream() -> None:
        with httpx.stream("POST", stack.url + "/api/chat", timeout=30,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"model": "llama3.2", "messages": [
                              {"role": "user", "content": "[[sim:rate=20]] [[sim:tokens=2000]]"}]}) as r:
            chunks = r.iter_bytes()  # held: a dropped iterator would close the stream
            next(chunks)
            streaming.set()
            done.wait(30)  # then leave: the stream is cut short

    worker = threading.Thread(target=slow_stream, daemon=True)
    worker.start()
    try:
        assert streaming.wait(10)
        wait(browser, lambda d: text_of(d, "#ov-in-flight") == "1")  # the next 2 s refresh
    finally:
        done.set()
        worker.join(30)
    wait(browser, lambda d: text_of(d, "#ov-in-flight") == "0")
