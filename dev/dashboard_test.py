#!/usr/bin/env python3
"""The dashboard (/dashboard) in a real browser, part of `make test`.

Starts an ingest, a consumer and a query API (the binaries `cargo test` built) against the local
stack with their own database and topic, sends two orgs' events through the ingest as an SDK would,
then drives Debian's headless Chromium with Selenium:
  - a wrong key is refused with a message, and the page shows nothing else;
  - signed in with org A's key: every KPI, the charts' series and points, the top models, the
    performance per service and the events list equal the query API's own answers for the range
    the page states (read back from the page), with money exact to the nano-dollar;
  - the events list pages with the cursor (older, newer);
  - an event ingested while the page is open appears without a reload (the live stream), and
    again after the query API restarts (the page reconnects);
  - the user view (one userId) equals the per-user answers;
  - nothing of org B (its model, its service) ever appears on A's page;
  - at phone width (390 px) the page does not scroll sideways; the charts carry text alternatives;
    the sign-in works from the keyboard alone.
Screenshots of the org view, the user view and the phone view go to --screenshots (docs/img for
the README: `make screenshots`). The last line is `N passed, M failed`; exits non-zero on a failure.

  TALLY_BIN_DIR=... dev/dashboard_test.py [--screenshots DIR]   (run with `dev/tools.sh browser`'s python)
"""

import argparse
import base64
import os
import random
import subprocess
import sys
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "loadtest"))
sys.path.insert(0, os.path.join(ROOT, "dev"))
import bench_ingest as services  # noqa: E402  (process helpers shared with the benchmarks)
from tally_api import call  # noqa: E402

INGEST = "http://127.0.0.1:18380"
QUERY = "http://127.0.0.1:18382"
SERVICES = ["chat", "search", "summarize"]
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-3-5-sonnet"), ("openai", "gpt-4o-mini")]
USERS = ["alice", "bob", "carol"]
B_MODEL, B_SERVICE = "b-only-model-7f3a", "b-secret-service-7f3a"


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, ok, what):
        print(("  ok   " if ok else "  FAIL ") + what, flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok


def log(message):
    print(f"[dashboard] {message}", flush=True)


def money(nanos):
    """The page's format: dollars from nano-dollars, every significant digit, at least cents."""
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    fraction = f"{nanos % 1_000_000_000:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}${nanos // 1_000_000_000:,}.{fraction}"


def events_for(org_services, org_models, users, count, now):
    out = []
    for i in range(count):
        provider, model = random.choice(org_models)
        prompt, completion = random.randint(10, 3000), random.randint(1, 800)
        out.append({
            "eventId": str(uuid.uuid4()),
            "timestamp": (now - timedelta(minutes=random.randint(1, 3 * 24 * 60))).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "provider": provider, "model": model,
            "tokens": {"promptTokens": prompt, "completionTokens": completion, "totalTokens": prompt + completion},
            "latency": random.randint(40, 6000),
            "status": "error" if i % 9 == 0 else "success",
            "cost": round(random.uniform(0.0001, 0.3), 9),
            "service": random.choice(org_services),
            "userId": random.choice(users),
        })
    return out


def ingest(key, events):
    for start in range(0, len(events), 100):
        status, body = call("POST", INGEST + "/v1/ingest", key=key, body={"events": events[start:start + 100]})
        if status != 202 or body.get("rejected"):
            raise SystemExit(f"ingest answered {status}: {body}")


def wait_stored(key, total, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        status, body = call("GET", QUERY + "/api/telemetry/status", key=key)
        if status == 200 and body["totalEvents"] == total:
            return
        time.sleep(0.3)
    raise SystemExit(f"not all {total} events were stored within {seconds} s")


def api(key, path, **params):
    status, body = call("GET", QUERY + path + ("?" + urllib.parse.urlencode(params) if params else ""), key=key)
    if status != 200:
        raise SystemExit(f"{path} answered {status}: {body}")
    return body


def browser(width=1280, height=1000):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}", "--force-device-scale-factor=1",
                 "--lang=en-US"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait(driver, condition, what, seconds=20):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise SystemExit(f"timed out after {seconds} s waiting for {what}")


def screenshot(driver, path):
    """The whole page, top to bottom, as a person scrolling it would see it."""
    driver.execute_script("window.scrollTo(0, 0)")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    with open(path, "wb") as out:
        out.write(base64.b64decode(shot["data"]))


def kpi(driver, name):
    return driver.find_element(By.CSS_SELECTOR, f'[data-kpi="{name}"]').text


def loaded_range(driver):
    element = driver.find_element(By.ID, "range")
    return element.get_attribute("data-from"), element.get_attribute("data-to")


def rows(driver, table):
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")]


def fixed(x, digits):
    """JavaScript's Number.prototype.toFixed: the exact binary value, halves rounded up."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def ms(value):
    return "–" if value is None else f"{fixed(value, 1 if value < 10 else 0)} ms"


def percent(ratio):
    return f"{fixed(ratio * 100, 3 if 0 < ratio < 0.001 else 1)} %"


def check_page(driver, checks, key, user, label):
    """Every figure on the page against the query API's answers for the range the page states."""
    frm, to = loaded_range(driver)
    scope = f"/analytics/user/{user}" if user else "/api/analytics"
    overview = api(key, scope + "/overview", **{"from": frm, "to": to})
    perf = api(key, scope + "/perf", **{"from": frm, "to": to})
    bucket = Select(driver.find_element(By.ID, "bucket")).first_selected_option.get_attribute("value")
    tz = Select(driver.find_element(By.ID, "tz")).first_selected_option.get_attribute("value")
    by_service = api(key, scope + "/timeseries", **{"from": frm, "to": to, "bucket": bucket, "tz": tz, "groupBy": "service"})
    by_model = api(key, scope + "/timeseries", **{"from": frm, "to": to, "bucket": bucket, "tz": tz, "groupBy": "model"})
    budget = api(key, "/api/costs/budget")
    checks.check(kpi(driver, "requests") == f"{overview['totalRequests']:,}",
                 f"{label}: requests {kpi(driver, 'requests')} = the API's {overview['totalRequests']}")
    checks.check(kpi(driver, "services") == str(overview["distinctServices"]),
                 f"{label}: services {kpi(driver, 'services')} = {overview['distinctServices']}")
    checks.check(kpi(driver, "p95") == ms(overview["latencyMs"]["p95"]),
                 f"{label}: p95 {kpi(driver, 'p95')} = {overview['latencyMs']['p95']}")
    checks.check(kpi(driver, "errorRate") == percent(overview["errorRate"]),
                 f"{label}: error rate {kpi(driver, 'errorRate')} = {overview['errorRate']}")
    checks.check(kpi(driver, "cost") == money(overview["costNanos"]),
                 f"{label}: cost {kpi(driver, 'cost')} = {overview['costNanos']} nano-dollars exactly")
    checks.check(money(budget["spentNanos"]) in kpi(driver, "budget") + driver.find_element(
        By.CSS_SELECTOR, '[data-kpi="budget"]').get_attribute("title"),
        f"{label}: budget shows the month's spend {money(budget['spentNanos'])}")
    for figure, answer in (("chart-requests", by_service), ("chart-cost", by_model)):
        element = driver.find_element(By.ID, figure)
        series = len({p["key"] for p in answer["points"]})
        points = len({p["time"] for p in answer["points"]})
        checks.check(element.get_attribute("data-series") == str(series) and element.get_attribute("data-points") == str(points),
                     f"{label}: {figure} has {series} series over {points} buckets, as the API's timeseries "
                     f"(page: {element.get_attribute('data-series')}, {element.get_attribute('data-points')})")
        marks = element.find_elements(By.CSS_SELECTOR, "svg rect, svg circle")
        checks.check(len(marks) > 0 and element.find_element(By.TAG_NAME, "svg").get_attribute("aria-label"),
                     f"{label}: {figure} drew {len(marks)} marks and has a text alternative")
    models = rows(driver, "models")
    checks.check([r[0] for r in models] == [m["name"] for m in overview["topModels"]]
                 and [r[3] for r in models] == [money(m["costNanos"]) for m in overview["topModels"]],
                 f"{label}: top models {[r[0] for r in models]} with their exact costs")
    perf_rows = rows(driver, "perf")
    checks.check([r[0] for r in perf_rows] == [s["service"] for s in perf["services"]]
                 and [r[3] for r in perf_rows] == [ms(s["latencyMs"]["p95"]) for s in perf["services"]],
                 f"{label}: performance per service {[r[0] for r in perf_rows]} with p95 as answered")
    return overview


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screenshots", default=os.path.join(ROOT, ".dev", "dashboard"))
    args = parser.parse_args()
    os.makedirs(args.screenshots, exist_ok=True)
    checks = Checks()
    database = "tally_t_dash_%012x" % random.getrandbits(48)
    topic = "tally.t.dash.%08x" % random.getrandbits(32)
    services.create_topic(topic, 2)
    services.create_topic(topic + ".dlq", 1)
    common = {"TALLY_CLICKHOUSE_DATABASE": database}
    query_env = {**common, "TALLY_ADMIN_TOKEN": services.ADMIN, "TALLY_LISTEN_ADDR": "127.0.0.1:18382"}
    processes = {"query": services.start("tally-query-api", query_env)}
    driver = None
    try:
        services.wait_http(QUERY + "/readyz", 60)  # migrated
        processes["ingest"] = services.start("tally-ingest", {
            **common, "TALLY_LISTEN_ADDR": "127.0.0.1:18380", "TALLY_EVENTS_TOPIC": topic,
            "TALLY_DLQ_TOPIC": topic + ".dlq", "TALLY_KEY_REFRESH_MS": "300"})
        processes["consumer"] = services.start("tally-consumer", {
            **common, "TALLY_LISTEN_ADDR": "127.0.0.1:18381", "TALLY_EVENTS_TOPIC": topic,
            "TALLY_DLQ_TOPIC": topic + ".dlq", "TALLY_CONSUMER_GROUP": topic + ".consumer", "TALLY_MIGRATE": "false",
            "TALLY_BATCH_MAX_WAIT_MS": "100"})
        services.wait_http(INGEST + "/readyz", 60)
        orgs = {}
        for name in ("a", "b"):
            status, body = call("POST", QUERY + "/admin/orgs", token=services.ADMIN, body={"name": f"dash-{name}", "plan": "startup"})
            assert status == 201, body
            orgs[name] = body
        key_a, key_b = orgs["a"]["apiKey"], orgs["b"]["apiKey"]
        call("PUT", QUERY + "/api/costs/budget", key=key_a, body={"limit": 5, "thresholds": [50, 80, 100]})
        time.sleep(1)  # the ingest's key refresh
        now = datetime.now(timezone.utc)
        a_events = events_for(SERVICES, MODELS, USERS, 160, now)
        ingest(key_a, a_events)
        ingest(key_b, events_for([B_SERVICE], [("openai", B_MODEL)], ["mallory"], 40, now))
        wait_stored(key_a, len(a_events))
        wait_stored(key_b, 40)
        log(f"{len(a_events)} events of org A and 40 of org B stored; opening Chromium")

        driver = browser()
        driver.get(QUERY + "/dashboard")
        wait(driver, lambda d: d.find_element(By.ID, "key").is_displayed(), "the sign-in form")
        checks.check(driver.switch_to.active_element == driver.find_element(By.ID, "key"),
                     "the key field has the focus on arrival (keyboard users start typing)")
        driver.switch_to.active_element.send_keys("tally_wrong-key-000000000000000000", Keys.ENTER)
        error = wait(driver, lambda d: d.find_element(By.ID, "signin-error").is_displayed() and d.find_element(By.ID, "signin-error"),
                     "the wrong key's message")
        checks.check("refused" in error.text and not driver.find_element(By.ID, "main").is_displayed(),
                     f"a wrong key shows an error and no data: {error.text!r}")

        driver.switch_to.active_element.send_keys(key_a, Keys.ENTER)  # the keyboard alone
        wait(driver, lambda d: d.find_element(By.ID, "range").get_attribute("data-from"), "the org view")
        wait(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live", "the live stream")
        checks.check(key_a not in driver.current_url and key_a not in driver.execute_script("return document.documentElement.outerHTML"),
                     "the key is in neither the address nor the page")
        checks.check(driver.execute_script("return sessionStorage.getItem('tally.apiKey')") == key_a
                     and driver.execute_script("return localStorage.length") == 0,
                     "the key is kept for the tab only (sessionStorage, nothing in localStorage)")
        check_page(driver, checks, key_a, None, "org view")
        events = rows(driver, "events")
        first = api(key_a, "/api/costs", **dict(zip(("from", "to"), loaded_range(driver)), limit=25))
        checks.check(len(events) == len(first["events"]) == 25
                     and [r[5] for r in events] == [money(e["costNanos"]) for e in first["events"]]
                     and [r[4] for r in events] == [f"{e['tokens']['totalTokens']:,}" for e in first["events"]],
                     "the events list shows the API's first page (25, newest first, exact costs, tokens)")
        driver.find_element(By.ID, "older").click()
        wait(driver, lambda d: d.find_element(By.ID, "page").text == "page 2", "the second page")
        second = api(key_a, "/api/costs", **dict(zip(("from", "to"), loaded_range(driver)), limit=25, cursor=first["nextCursor"]))
        checks.check([r[5] for r in rows(driver, "events")] == [money(e["costNanos"]) for e in second["events"]]
                     and driver.find_element(By.ID, "newer").is_enabled(),
                     "Older shows the API's page after the cursor; Newer comes back")
        driver.find_element(By.ID, "newer").click()
        wait(driver, lambda d: d.find_element(By.ID, "page").text == "page 1", "the first page again")
        screenshot(driver, os.path.join(args.screenshots, "dashboard-org.png"))

        # Live: an event sent now shows without a reload.
        driver.execute_script("window.__sameDocument = true")
        before = int(kpi(driver, "requests").replace(",", ""))
        sent = time.time()
        live = events_for(["live-service"], [("openai", "gpt-4o")], ["alice"], 1, datetime.now(timezone.utc))
        live[0]["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        ingest(key_a, live)
        wait(driver, lambda d: kpi(d, "requests") == f"{before + 1:,}", "the live event on the page", 15)
        checks.check(driver.execute_script("return window.__sameDocument === true"),
                     f"an event ingested during the test appeared without a reload ({time.time() - sent:.1f} s after its 202)")
        check_page(driver, checks, key_a, None, "org view after the live event")

        # The query API restarts: the page reconnects and keeps updating.
        services.stop(processes.pop("query"))
        wait(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "reconnecting", "the page noticing", 15)
        processes["query"] = services.start("tally-query-api", query_env)
        services.wait_http(QUERY + "/readyz", 60)
        wait(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live", "the reconnection", 30)
        again = events_for(["live-service"], [("openai", "gpt-4o")], ["alice"], 1, datetime.now(timezone.utc))
        again[0]["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        ingest(key_a, again)
        wait(driver, lambda d: kpi(d, "requests") == f"{before + 2:,}", "a live event after the restart", 20)
        checks.check(driver.execute_script("return window.__sameDocument === true"),
                     "after a query API restart the stream reconnected and the next event appeared live")

        # The user view.
        driver.find_element(By.CSS_SELECTOR, "input[name=view][value=user]").click()
        driver.find_element(By.ID, "user").send_keys("alice")
        driver.find_element(By.CSS_SELECTOR, "#controls button[type=submit]").click()
        wait(driver, lambda d: "alice" in d.find_element(By.ID, "range").text, "the user view")
        overview = check_page(driver, checks, key_a, "alice", "user view (alice)")
        checks.check(all(r[3] == "alice" for r in rows(driver, "events")) and overview["totalRequests"] < len(a_events),
                     "the user view lists only alice's events")
        screenshot(driver, os.path.join(args.screenshots, "dashboard-user.png"))

        # Org B's data never appears on A's page (org view, user view, after live updates).
        text = driver.execute_script("return document.documentElement.outerHTML")
        checks.check(B_MODEL not in text and B_SERVICE not in text and "mallory" not in text,
                     "nothing of org B (its model, service, user) appears on org A's page")
        driver.find_element(By.ID, "f-model").send_keys(B_MODEL)
        driver.find_element(By.CSS_SELECTOR, "#filters button").click()
        wait(driver, lambda d: "No events match" in d.find_element(By.ID, "events").text, "the filtered list", 10)
        checks.check(True, "filtering A's events by B's model finds none")

        # Phone width.
        driver.quit()
        driver = browser()
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        driver.get(QUERY + "/dashboard")
        wait(driver, lambda d: d.find_element(By.ID, "key").is_displayed(), "the sign-in form (phone)")
        driver.find_element(By.ID, "key").send_keys(key_a, Keys.ENTER)
        wait(driver, lambda d: d.find_element(By.ID, "range").get_attribute("data-from"), "the org view (phone)")
        wait(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "live", "the live stream (phone)")
        wide = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        checks.check(wide[0] <= wide[1], f"at phone width the page does not scroll sideways (content {wide[0]} px, window {wide[1]} px)")
        screenshot(driver, os.path.join(args.screenshots, "dashboard-phone.png"))
        log(f"screenshots in {os.path.relpath(args.screenshots, ROOT)}")
    finally:
        if driver:
            driver.quit()
        for process in processes.values():
            services.stop(process)
        services.delete_topic(topic)
        services.delete_topic(topic + ".dlq")
        for db in (database, database + "_admin"):
            subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8123/", "--data", "DROP DATABASE IF EXISTS " + db])
    print(f"{checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
