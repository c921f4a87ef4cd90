"""The playground and vloop-feedback.js in a real browser: headless Chromium driven by Selenium.

Chromium and chromedriver come from Debian's packages (`make browser`; the fixture installs them
as root where missing). The test plays a user: upload a photo, ask, edit the answer, stay a
moment, close the tab; the lake must then hold the interaction and its edit, dwell and close,
each once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_serving import Server, lake_table, wait_for
from vloop.store.lake import open_lake
from vloop.store.schema import FEEDBACK, INTERACTION
from vloop.sim.synth import World

CHROMEDRIVER = Path("/usr/bin/chromedriver")


def ensure_chromium() -> None:
    if CHROMEDRIVER.exists() and shutil.which("chromium"):
        return
    if os.geteuid() != 0:
        pytest.fail("chromium and chromium-driver are missing: run `sudo make browser` "
                    "(apt-get install chromium chromium-driver)")
    from filelock import FileLock

    with FileLock(Path(tempfile.gettempdir()) / "vloop-tests-apt.lock"):  # pytest-xdist workers: one apt-get at a time
        if CHROMEDRIVER.exists() and shutil.which("chromium"):  # another worker installed them meanwhile
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "chromium", "chromium-driver"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:  # stale package lists
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(cmd, env=env, capture_output=True, check=True)


@pytest.fixture
def browser(tmp_path):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,1000",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_edit_dwell_and_close_reach_the_lake(browser, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lake_url = (tmp_path / "lake").as_uri()
    srv = Server(tiny_model_dir, lake_url, tmp_path)
    srv.args.append("--playground")
    srv.start()
    photo = tmp_path / "shoe.png"
    World(2).sample(0, intents=("colour",)).image.save(photo)
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(srv.url + "/playground")
        page = browser.current_window_handle
        text = lambda el_id: browser.find_element(By.ID, el_id).text  # noqa: E731

        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        q = browser.find_element(By.ID, "question")
        q.clear()
        q.send_keys("What colour are these shoes?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: text("status") in ("answered",) or text("status").startswith(("refused", "failed", "error")))
        assert text("status") == "answered", text("status")
        answered = time.monotonic()
        rid = browser.execute_script("return window.vloopTracker.requestId")
        assert rid in text("meta") and "confidence" in text("meta")

        browser.find_element(By.ID, "edit").click()
        box = browser.find_element(By.ID, "edited")
        box.clear()
        box.send_keys("they are blue")
        browser.find_element(By.ID, "save").click()
        wait.until(lambda d: text("status") in ("edit sent",) or "failed" in text("status"))
        assert text("status") == "edit sent"

        time.sleep(2.5)  # the user reads the answer
        # Close the tab with another one open, so the browser lives on to send the beacons.
        browser.switch_to.new_window("tab")
        other = browser.current_window_handle
        browser.switch_to.window(page)
        browser.close()
        closed = time.monotonic()
        browser.switch_to.window(other)

        lake = open_lake(lake_url)

        def events():
            t = lake_table(lake, "raw/feedback", FEEDBACK.arrow).to_pylist()
            return t if {"dwell", "close"} <= {e["type"] for e in t} else None

        wait_for(events, 30, "the beacons' dwell and close events in the lake")
        time.sleep(1)  # anything sent twice would have arrived by now
    finally:
        srv.stop()
    inter = lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()
    assert [x["request_id"] for x in inter] == [rid]
    assert inter[0]["image_key"] and inter[0]["status"] == "ok"
    fb = lake_table(lake, "raw/feedback", FEEDBACK.arrow).to_pylist()
    assert all(e["request_id"] == rid for e in fb)
    assert sorted(e["type"] for e in fb) == ["close", "dwell", "edit"], fb
    by_type = {e["type"]: e for e in fb}
    assert by_type["edit"]["edited_text"] == "they are blue"
    # On screen from the answer until the tab went to the background: at least the pause, at most
    # the whole time the page showed the answer.
    assert 2500 <= by_type["dwell"]["dwell_ms"] <= (closed - answered) * 1000 + 1000, by_type["dwell"]
