#!/usr/bin/python3
"""Drives the web console in Debian's chromium (through chromedriver and selenium) against a running demo.

Run by system/browser/check-console.sh, which starts the demo and passes its addresses and keys in the
environment. Each step saves a screenshot under $SHOTS; the assertions are on the page's content.

Steps: fill the pool with $THINGS things; sign in; see both workers and the gateway; time the devices page;
find a thing; watch a device come online and its temperature change without a reload; its history chart; write
a property and see the device act on it; a viewer key sees no write form."""

import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

API = os.environ["API"]  # host:port of a worker's API (plain HTTP on loopback)
ADMIN_KEY = os.environ["ADMIN_KEY"]
VIEWER_KEY = os.environ["VIEWER_KEY"]
DEVICE_CMD = os.environ["DEVICE_CMD"]  # the example device's command line, for thing browser-device
SHOTS = os.environ["SHOTS"]
THINGS = int(os.environ.get("THINGS", "100000"))
FIRST_PAGE_MS = float(os.environ.get("FIRST_PAGE_MS", "300"))
BASE = f"http://{API}"


def call(method, path, body=None, key=ADMIN_KEY, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection(API, timeout=30)
    headers = {"x-api-key": key}
    data = None
    if body is not None:
        data = json.dumps(body)
        headers["content-type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    text = response.read()
    if own:
        conn.close()
    return response.status, (json.loads(text) if text else None)


def fill(count):
    """Creates things fill-000000 ... with 16 connections; returns the seconds it took."""
    started = time.monotonic()

    def create(worker):
        conn = http.client.HTTPConnection(API, timeout=60)
        for i in range(worker, count, 16):
            tag = ["line-%d" % (i % 10)]
            status, body = call("PUT", f"/v1/things/fill-{i:06d}", {"tags": tag}, conn=conn)
            if status not in (200, 201):
                raise SystemExit(f"creating fill-{i:06d}: {status} {body}")
        conn.close()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(16)))
    return time.monotonic() - started


step_number = 0


def shot(driver, name):
    global step_number
    step_number += 1
    path = os.path.join(SHOTS, f"{step_number:02d}-{name}.png")
    driver.save_screenshot(path)
    print(f"  screenshot {path}")


def wait(driver, what, condition, seconds=15):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        shot(driver, "failed")
        raise SystemExit(f"FAILED: {what} (within {seconds} s)")


def text(driver, css):
    """The text of the first element `css` selects, read in one script (the page replaces rows as values change)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def sign_in(driver, key):
    driver.get(BASE + "/console")
    field = wait(driver, "the sign-in form", lambda d: d.find_element(By.ID, "key"))
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(driver, "the pool page after signing in", lambda d: d.find_elements(By.CSS_SELECTOR, "#members tr"))


def temperature(driver):
    cell = text(driver, "tr[data-property=temperature] td.value")
    return float(cell) if cell else None


def main():
    os.makedirs(SHOTS, exist_ok=True)
    if THINGS:
        took = fill(THINGS)
        print(f"pool filled with {THINGS} things in {took:.1f} s")
    status, _ = call("PUT", "/v1/things/browser-device", {"tags": ["browser"]})
    assert status in (200, 201), status

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                "--disable-gpu"]:
        options.add_argument(arg)
    service = Service(executable_path="/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    device = None
    try:
        # sign in; the pool: both workers, healthy, and the gateway linked
        sign_in(driver, ADMIN_KEY)
        wait(driver, "both workers healthy", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#members tr")) == 2
             and text(d, "#members").count("ok") == 2)
        wait(driver, "the gateway linked to a worker", lambda d: "gateway-1" in text(d, "#members"))
        members = text(driver, "#members")
        assert "foundation-1" in members and "foundation-2" in members, members
        shot(driver, "pool")

        # the devices page, loaded afresh (not a change of the hash): its first page of things, timed by the browser
        driver.get("about:blank")
        driver.get(BASE + "/console#/devices")
        wait(driver, "the devices page", lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-rendered"))
        first_page = float(driver.find_element(By.TAG_NAME, "body").get_attribute("data-rendered"))
        rows = len(driver.find_elements(By.CSS_SELECTOR, "#things tr"))
        matching = text(driver, "#matching")
        print(f"devices page: first page of {rows} things drawn {first_page:.0f} ms after navigation "
              f"({matching})")
        assert rows == min(50, THINGS + 1), rows
        assert str(THINGS + 1) in matching, matching
        shot(driver, "devices")
        if first_page > FIRST_PAGE_MS:
            raise SystemExit(f"FAILED: the devices page took {first_page:.0f} ms (target {FIRST_PAGE_MS:.0f} ms)")

        # search by name: the thing the device will be
        field = driver.find_element(By.ID, "search")
        field.clear()
        field.send_keys("browser")
        driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
        wait(driver, "the search's result", lambda d: [r.get_attribute("data-thing") for r in
                                                       d.find_elements(By.CSS_SELECTOR, "#things tr")]
             == ["browser-device"])
        assert "offline" in text(driver, "#things tr")
        shot(driver, "search")

        # the thing page; then the device connects: online and a changing temperature, with no reload
        driver.find_element(By.LINK_TEXT, "browser-device").click()
        wait(driver, "the thing page", lambda d: text(d, "#thing-name") == "browser-device")
        assert text(driver, "#online") == "offline"
        driver.execute_script("window.notReloaded = true;")
        shot(driver, "thing-offline")
        device = subprocess.Popen(DEVICE_CMD, shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(driver, "the device online", lambda d: text(d, "#online") == "online", 30)
        assert text(driver, "#gateway") == "wss through gateway-1", text(driver, "#gateway")
        first = wait(driver, "a temperature", temperature)
        wait(driver, "the temperature changing", lambda d: (temperature(d) or first) != first, 20)
        assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded"
        shot(driver, "thing-live")

        # the history chart over the last 5 minutes
        driver.find_element(By.CSS_SELECTOR, "button[data-range='5 min']").click()
        wait(driver, "a history chart with points", lambda d: int(d.find_element(By.ID, "chart")
                                                                .get_attribute("data-points") or 0) >= 2)
        shot(driver, "history")

        # a property write: the device acknowledges it and reports temperatures from the new setpoint
        form = driver.find_element(By.ID, "write")
        form.find_element(By.NAME, "property").send_keys("setpoint")
        form.find_element(By.NAME, "value").send_keys("50")
        form.find_element(By.TAG_NAME, "button").click()
        wait(driver, "the write's answer", lambda d: "delivered" in text(d, "#write-answer"))
        answer = json.loads(text(driver, "#write-answer"))
        assert answer == {"stored": True, "delivered": True}, answer
        wait(driver, "a temperature from the new setpoint", lambda d: (temperature(d) or 0) >= 50, 20)
        assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded"
        shot(driver, "written")

        # a property removed through the API leaves the page with no reload
        wait(driver, "the setpoint's row", lambda d: d.find_elements(By.CSS_SELECTOR, "tr[data-property='setpoint']"))
        status, _ = call("DELETE", "/v1/things/browser-device/properties/setpoint")
        assert status == 204, status
        wait(driver, "the setpoint's row gone",
             lambda d: not d.find_elements(By.CSS_SELECTOR, "tr[data-property='setpoint']"))
        assert driver.execute_script("return window.notReloaded === true;"), "the page was reloaded"

        # a viewer sees the thing but no form to write or call
        driver.find_element(By.ID, "logout").click()
        sign_in(driver, VIEWER_KEY)
        assert "viewer" in text(driver, "#whoami")
        driver.get(BASE + "/console#/thing/browser-device")
        driver.refresh()
        wait(driver, "the thing page as a viewer", lambda d: text(d, "#thing-name") == "browser-device")
        wait(driver, "the viewer's live temperature", temperature)
        assert not driver.find_elements(By.ID, "write"), "a viewer sees a write form"
        assert not driver.find_elements(By.ID, "call"), "a viewer sees a call form"
        shot(driver, "viewer")
        status, _ = call("PUT", "/v1/things/browser-device/properties/setpoint", {"value": 1}, key=VIEWER_KEY)
        assert status == 403, status
        print("console: every step passed")
    finally:
        if device:
            device.terminate()
            device.wait()
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
