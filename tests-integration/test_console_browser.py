"""The operator console in a real headless Chromium, against a real ``cycles serve`` process.

Chromium and its driver come from the system's packages (Debian: ``chromium``,
``chromium-driver``; ``.ci/run`` installs them when missing); Selenium drives them through
``/usr/bin/chromedriver`` and never downloads a browser. Without them these tests skip with
the reason, or fail when ``CYCLES_REQUIRE_CHROMIUM=1`` (CI sets it).

Every test saves a screenshot of its page at 1280x800 under ``tests-integration/artifacts/
console/`` (git-ignored; CI keeps it as an artifact) and checks that the page does not
scroll sideways at that size.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles_server.roles import TENANT_ADMIN_PERMISSIONS
from runcycles_server.testing import ProvisionedTenant, ServerProcess

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("CYCLES_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CYCLES_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
WIDTH, HEIGHT = 1280, 800
U = "USD_MICROCENTS"


def _unavailable(reason: str) -> None:
    if os.environ.get("CYCLES_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"CYCLES_REQUIRE_CHROMIUM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess.start(store="sqlite") as process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(path)):
            _unavailable(f"{path} is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},{HEIGHT}", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        _unavailable(f"Chromium did not start: {exc.msg}")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    driver.implicitly_wait(0)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: WebDriver, server: ServerProcess) -> WebDriver:
    """The browser, signed out, at the console's sign-in page."""
    browser.get(f"{server.base_url}/console/sign-in")
    browser.delete_all_cookies()
    return browser


def shoot(driver: WebDriver, name: str) -> None:
    """Save a 1280x800 screenshot and check the page does not scroll sideways."""
    assert driver.get_screenshot_as_file(str(ARTIFACTS / f"{name}.png"))
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{name}: the page scrolls {overflow}px sideways at {WIDTH}px"


def sign_in(driver: WebDriver, server: ServerProcess, key: str) -> None:
    driver.get(f"{server.base_url}/console/")
    assert "/console/sign-in" in driver.current_url
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(driver, lambda d: "/console/sign-in" not in d.current_url)


def wait_for(driver: WebDriver, condition: Any, timeout_s: float = 10) -> Any:
    # A page being replaced (a form just posted, a live refresh) leaves stale elements behind
    # for a moment: look again rather than fail.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    wait = WebDriverWait(driver, timeout_s, poll_frequency=0.1, ignored_exceptions=ignored)
    return wait.until(condition)


def text(driver: WebDriver) -> str:
    return str(driver.find_element(By.TAG_NAME, "main").text)


def reserve(tenant: ProvisionedTenant, amount: int) -> Any:
    with tenant.client() as client:
        return client.create_reservation(
            {
                "idempotency_key": f"k-{uuid.uuid4()}",
                "subject": {"tenant": tenant.tenant_id},
                "action": {"kind": "llm.completion", "name": "gpt-x"},
                "estimate": {"unit": U, "amount": amount},
            }
        )


def test_sign_in_and_every_page_fits_a_laptop_screen(
    page: WebDriver, server: ServerProcess
) -> None:
    tenant = server.provision(budget=100_000_000)
    deep = "/workspace:research-and-development/app:customer-support-assistant/agent:summarizer"
    tenant.add_budget(5_000_000, scope=f"tenant:{tenant.tenant_id}{deep}")  # a long scope
    reserve(tenant, 100_000)
    with tenant.client() as client:  # some spend for the chart
        for n in range(1, 6):
            rid = reserve(tenant, 3_000_000).body["reservation_id"]
            done = client.commit_reservation(
                rid, {"idempotency_key": f"c-{rid}", "actual": {"unit": U, "amount": n * 500_000}}
            )
            assert done.status == 200
    page.get(f"{server.base_url}/console/sign-in")
    shoot(page, "sign-in")
    sign_in(page, server, server.admin_key)
    assert page.current_url.endswith("/console/overview")
    cookie = page.get_cookie("cycles_console")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert page.execute_script("return document.cookie") == ""  # nothing readable by scripts
    for slug in ("tenants", f"tenants/{tenant.tenant_id}", "budgets", "reservations",
                 "events", "webhooks", "audit"):  # fmt: skip
        page.get(f"{server.base_url}/console/{slug}")
        assert page.find_element(By.TAG_NAME, "h1").text
        shoot(page, slug.replace("/", "-").replace(tenant.tenant_id, "detail"))
    page.get(f"{server.base_url}/console/spend?tenant={tenant.tenant_id}&range=hour")
    summary = page.find_element(By.CSS_SELECTOR, "dl.spend-summary")
    assert "$0.075 (5 commits)" in summary.text  # 0.5 + 1 + ... + 2.5 cents
    assert len(page.find_elements(By.CSS_SELECTOR, "svg rect.spend-bar")) == 12
    shoot(page, "spend")
    # keyboard: the skip link is the first stop and leads to the content
    page.get(f"{server.base_url}/console/budgets")
    page.find_element(By.TAG_NAME, "body").send_keys("\ue004")  # Tab
    focused = page.switch_to.active_element
    assert focused.text == "Skip to content"
    focused.send_keys("\ue007")  # Enter
    assert page.switch_to.active_element.get_attribute("id") == "main"


def test_a_tenant_reaching_80_percent_shows_in_the_overview(
    page: WebDriver, server: ServerProcess
) -> None:
    tenant = server.provision(budget=1_000_000)
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/overview")
    scope = f"tenant:{tenant.tenant_id}"
    assert scope not in text(page)
    for _ in range(4):  # 4 x 20 % through the client, while the page is open
        assert reserve(tenant, 200_000).status == 200
    # the live refresh (every 5 s while the tab is visible) brings it in without a reload
    wait_for(page, lambda d: scope in text(d), timeout_s=15)
    row = page.find_element(By.XPATH, f"//tr[td/a[text()='{scope}']]")
    assert "80 %" in row.text
    assert "near limit" in row.text  # said in words, not by colour alone
    shoot(page, "overview")
    page.find_element(By.PARTIAL_LINK_TEXT, "budgets at 80 % or more").click()
    assert scope in text(page)


def test_freeze_a_budget_and_the_next_reservation_is_denied(
    page: WebDriver, server: ServerProcess
) -> None:
    tenant = server.provision(budget=1_000_000)
    assert reserve(tenant, 1_000).status == 200
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/budgets?tenant_id={tenant.tenant_id}")
    scope = f"tenant:{tenant.tenant_id}"
    page.find_element(By.XPATH, f"//summary[contains(., '{scope}')]").click()
    page.find_element(By.CSS_SELECTOR, "form[action$='/budgets/freeze'] button").click()
    assert "/budgets/freeze" not in page.current_url  # the browser refuses an empty reason
    page.find_element(
        By.CSS_SELECTOR, "form[action$='/budgets/freeze'] input[name=reason]"
    ).send_keys("runaway agent, ticket 1234")
    page.find_element(By.CSS_SELECTOR, "form[action$='/budgets/freeze'] button").click()
    wait_for(page, lambda d: "frozen" in text(d))
    assert "FROZEN" in page.find_element(By.XPATH, f"//tr[@data-scope='{scope}']").text
    shoot(page, "budgets-frozen")
    denied = reserve(tenant, 1_000)
    assert denied.status == 409
    assert denied.body["error"] == "BUDGET_FROZEN"
    page.get(f"{server.base_url}/console/audit?tenant_id={tenant.tenant_id}")
    assert "freezeBudget" in text(page)
    assert "runaway agent, ticket 1234" in text(page)
    shoot(page, "audit")


def test_force_release_a_reservation(page: WebDriver, server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000_000)
    rid = reserve(tenant, 250_000).body["reservation_id"]
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/reservations")
    Select(page.find_element(By.ID, "f-tenant")).select_by_visible_text(tenant.tenant_id)
    page.find_element(By.CSS_SELECTOR, "form.filters button").click()
    row = f"//tr[@data-reservation='{rid}']"
    page.find_element(By.XPATH, row)
    shoot(page, "reservations")
    # The live refresh may replace the table between finding an element and using it: each
    # step looks the element up again until it acts (typing pauses the refresh).
    wait_for(page, lambda d: d.find_element(By.XPATH, f"{row}//*[@name='reason']").send_keys(
        "agent crashed") or True)  # fmt: skip
    wait_for(page, lambda d: d.find_element(By.XPATH, f"{row}//button").click() or True)
    wait_for(page, lambda d: f"Reservation {rid} released." in text(d))
    assert not page.find_elements(By.XPATH, f"//tr[@data-reservation='{rid}']")
    shoot(page, "reservations-released")
    with tenant.client() as client:
        assert client.get_reservation(rid).body["status"] == "RELEASED"
    balance = server.admin("GET", "/v1/admin/budgets", params={"tenant_id": tenant.tenant_id})
    assert balance["ledgers"][0]["reserved"]["amount"] == 0


def test_filter_events(page: WebDriver, server: ServerProcess) -> None:
    tenant = server.provision(budget=1_000_000)
    reserve(tenant, 10)
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/events")
    page.find_element(By.ID, "f-tenant").send_keys(tenant.tenant_id)
    Select(page.find_element(By.ID, "f-type")).select_by_visible_text("budget.created")
    page.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait_for(page, lambda d: "event_type=budget.created" in d.current_url)
    rows = page.find_elements(By.CSS_SELECTOR, "tr[data-event-type]")
    assert len(rows) == 1
    assert rows[0].get_attribute("data-event-type") == "budget.created"
    assert tenant.tenant_id in rows[0].text
    shoot(page, "events")
    Select(page.find_element(By.ID, "f-type")).select_by_visible_text("any")
    Select(page.find_element(By.ID, "f-cat")).select_by_visible_text("tenant")
    page.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait_for(page, lambda d: "category=tenant" in d.current_url)
    types = {
        r.get_attribute("data-event-type")
        for r in page.find_elements(By.CSS_SELECTOR, "tr[data-event-type]")
    }
    assert types == {"tenant.created"}


def test_a_tenant_key_cannot_see_another_tenant(page: WebDriver, server: ServerProcess) -> None:
    mine = server.provision(budget=1_000_000, permissions=TENANT_ADMIN_PERMISSIONS)
    theirs = server.provision(budget=2_000_000)
    sign_in(page, server, mine.api_key)
    assert page.current_url.endswith(f"/console/tenants/{mine.tenant_id}")
    assert f"tenant:{mine.tenant_id}" in text(page)
    assert "read-only" in page.find_element(By.CLASS_NAME, "who").text
    shoot(page, "tenant-read-only")
    page.get(f"{server.base_url}/console/tenants/{theirs.tenant_id}")
    assert "cannot see" in text(page)
    assert f"tenant:{theirs.tenant_id}" not in page.page_source
    shoot(page, "tenant-forbidden")
    for url in (f"budgets?tenant_id={theirs.tenant_id}", f"reservations?tenant={theirs.tenant_id}",
                f"events?scope=tenant:{theirs.tenant_id}", "overview", "audit"):  # fmt: skip
        page.get(f"{server.base_url}/console/{url}")
        assert f"tenant:{theirs.tenant_id}" not in page.page_source
    assert not page.find_elements(By.CSS_SELECTOR, "form[method=post] input[name=reason]")


def test_a_request_without_the_csrf_token_is_refused(
    page: WebDriver, server: ServerProcess
) -> None:
    tenant = server.provision(budget=1_000_000)
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/budgets?tenant_id={tenant.tenant_id}")
    status = page.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const body = new URLSearchParams({scope: arguments[0], unit: "USD_MICROCENTS",
                                          reason: "no token"});
        fetch("/console/budgets/freeze", {method: "POST", body, credentials: "same-origin"})
          .then(r => done(r.status), e => done(String(e)));
        """,
        f"tenant:{tenant.tenant_id}",
    )
    assert status == 403
    # a real form submission with its token removed is refused the same way
    page.execute_script(
        "document.querySelectorAll('input[name=csrf_token]').forEach(e => e.remove());"
    )
    page.find_element(By.CSS_SELECTOR, "summary").click()
    form = page.find_element(By.CSS_SELECTOR, "form[action$='/budgets/freeze']")
    form.find_element(By.NAME, "reason").send_keys("forged")
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait_for(page, lambda d: "CSRF" in text(d))
    shoot(page, "csrf-refused")
    budget = server.admin("GET", "/v1/admin/budgets", params={"tenant_id": tenant.tenant_id})
    assert budget["ledgers"][0]["status"] == "ACTIVE"
    # and a request from another site never carries the session (SameSite=Strict)
    cookie = page.get_cookie("cycles_console")
    assert cookie is not None
    assert cookie["sameSite"] == "Strict"
    assert httpx.get(f"{server.base_url}/console/overview").status_code == 303


def test_cycles_serve_no_console_serves_none() -> None:
    with ServerProcess.start(store="sqlite", extra_args=["--no-console"]) as process:
        assert httpx.get(f"{process.base_url}/console/sign-in").status_code == 404
        assert httpx.get(f"{process.base_url}/healthz").status_code == 200


# --------------------------------------------------------------------------------------------
# Webhooks

HOOK_PERMS = ["reservations:create", "reservations:commit", "balances:read", "budgets:read",
              "policies:read", "webhooks:read", "webhooks:write"]  # fmt: skip


class Receiver:
    """A real local HTTP receiver: answers ``status``, keeps every event it was sent."""

    def __init__(self) -> None:
        self.status = 200
        self.events: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.events.append(json.loads(body))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def count(self, event_type: str) -> int:
        return sum(1 for e in self.events if e["event_type"] == event_type)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.http.shutdown()
    found.http.server_close()


def subscribe(server: ServerProcess, tenant: ProvisionedTenant, url: str, **fields: Any) -> str:
    """A subscription of the tenant to its threshold crossings (loopback http allowed)."""
    server.admin("PUT", "/v1/admin/config/webhook-security",
                 json={"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]})  # fmt: skip
    body = {"url": url, "event_types": ["budget.threshold_crossed"], "name": "alerts",
            "retry_policy": {"max_retries": 0}, **fields}  # fmt: skip
    created = server.admin("POST", "/v1/admin/webhooks", params={"tenant_id": tenant.tenant_id},
                           json=body)  # fmt: skip
    return str(created["subscription"]["subscription_id"])


def wait_until(condition: Any, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_webhooks_page_shows_a_failing_subscriptions_deliveries(
    page: WebDriver, server: ServerProcess, receiver: Receiver
) -> None:
    tenant = server.provision(budget=1_000_000, permissions=HOOK_PERMS)
    sid = subscribe(server, tenant, receiver.url, disable_after_failures=5)
    receiver.status = 500
    assert reserve(tenant, 850_000).status == 200  # crosses 80 %: one delivery, refused
    wait_until(lambda: receiver.count("budget.threshold_crossed") == 1)
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/webhooks?tenant_id={tenant.tenant_id}")
    row = f"//tr[@data-subscription='{sid}']"
    wait_for(page, lambda d: "failing" in d.find_element(By.XPATH, row).text, timeout_s=15)
    assert "1 of 5" in page.find_element(By.XPATH, row).text  # in words, not colour alone
    shoot(page, "webhooks")
    page.find_element(By.XPATH, f"{row}//a").click()
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-status='FAILED']"))
    failed = page.find_element(By.CSS_SELECTOR, "tr[data-status='FAILED']")
    assert "budget.threshold_crossed" in failed.text
    assert "HTTP 500" in failed.text
    assert "FAILED" in failed.text
    assert "Failures in a row" in text(page)
    shoot(page, "webhook-failing")
    # keyboard: every action control is reachable with Tab, each with a visible label
    labels = [e.text for e in page.find_elements(By.CSS_SELECTOR, ".webhook-actions label")]
    assert labels == ["Reason", "Replay events of", "at most", "Reason"]
    page.find_element(By.TAG_NAME, "body").send_keys("\ue004")  # Tab: the skip link
    stops = []
    for _ in range(40):
        page.switch_to.active_element.send_keys("\ue004")
        active = page.switch_to.active_element
        stops.append(active.get_attribute("id") or active.text)
        if active.text == "Replay":
            break
    assert stops.index("w-reason") < stops.index("rp-window") < stops.index("rp-reason")
    assert stops[-1] == "Replay"


def test_replay_from_the_page_sends_again_to_the_receiver(
    page: WebDriver, server: ServerProcess, receiver: Receiver
) -> None:
    tenant = server.provision(budget=1_000_000, permissions=HOOK_PERMS)
    sid = subscribe(server, tenant, receiver.url)
    assert reserve(tenant, 850_000).status == 200
    wait_until(lambda: receiver.count("budget.threshold_crossed") == 1)
    sign_in(page, server, server.admin_key)
    page.get(f"{server.base_url}/console/webhooks/{sid}")
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-status='SUCCESS']"))
    Select(page.find_element(By.ID, "rp-window")).select_by_visible_text("the last hour")
    reason = page.find_element(By.ID, "rp-reason")
    reason.send_keys("receiver lost its queue")
    reason.send_keys("\ue007")  # Enter submits the form: no mouse needed
    wait_for(page, lambda d: "queued for delivery again" in text(d))
    assert "1 event(s) of the last hour" in text(page)
    wait_until(lambda: receiver.count("budget.threshold_crossed") == 2)
    first, again = [e for e in receiver.events if e["event_type"] == "budget.threshold_crossed"]
    assert first["event_id"] == again["event_id"]  # the same event, sent again
    delivered = "tr[data-status='SUCCESS']"
    wait_for(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, delivered)) == 2, timeout_s=15)
    shoot(page, "webhook-replayed")
    page.find_element(By.XPATH, "//button[text()='Send a test event']").click()
    wait_for(page, lambda d: "Test delivered" in text(d))
    assert receiver.count("system.webhook_test") == 1
    page.get(f"{server.base_url}/console/audit?tenant_id={tenant.tenant_id}")
    assert "replayEvents" in text(page)
    assert "receiver lost its queue" in text(page)
    assert "testWebhookSubscription" in text(page)


def test_a_tenant_key_sees_only_its_own_webhooks(
    page: WebDriver, server: ServerProcess, receiver: Receiver
) -> None:
    mine = server.provision(budget=1_000_000, permissions=HOOK_PERMS)
    theirs = server.provision(budget=1_000_000, permissions=HOOK_PERMS)
    my_sid = subscribe(server, mine, receiver.url)
    their_sid = subscribe(server, theirs, receiver.url)
    sign_in(page, server, mine.api_key)
    page.get(f"{server.base_url}/console/webhooks")
    assert page.find_elements(By.XPATH, f"//tr[@data-subscription='{my_sid}']")
    assert their_sid not in page.page_source
    assert theirs.tenant_id not in page.page_source
    shoot(page, "webhooks-tenant")
    page.get(f"{server.base_url}/console/webhooks/{my_sid}")
    assert not page.find_elements(By.CSS_SELECTOR, "form[method=post] input[name=reason]")
    assert not page.find_elements(By.XPATH, "//button[text()='Send a test event']")
    page.get(f"{server.base_url}/console/webhooks/{their_sid}")
    assert "not found" in text(page)
    assert theirs.tenant_id not in page.page_source


def test_repeated_failed_sign_ins_are_refused_for_a_while(browser: WebDriver) -> None:
    # A server of its own: the lock applies to this machine's address.
    with ServerProcess.start(store="sqlite") as own:
        browser.get(f"{own.base_url}/console/sign-in")
        browser.delete_all_cookies()

        def attempt(key: str) -> str:
            browser.get(f"{own.base_url}/console/sign-in")
            browser.find_element(By.ID, "key").send_keys(key + "\ue007")  # Enter submits
            wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "p.flash-error"))
            return text(browser)

        for n in range(6):
            assert "not valid" in attempt(f"guess-{n}")
        refused = attempt(own.admin_key)  # the right key waits too, without being checked
        assert "Too many failed sign-ins" in refused
        assert "paused for 30 seconds" in refused
        assert browser.get_cookie("cycles_console") is None
        shoot(browser, "sign-in-limited")
