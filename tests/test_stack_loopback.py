"""`make up` (bin/stack): every service bound to loopback unless VLOOP_BIND_HOST says otherwise, and an
operator's first look at the loop in the Airflow UI, in a real browser.

The stack is started as `make up` starts it (Label Studio, serving on the tiny model, Airflow
standalone) in a temporary VLOOP_HOME on free ports, and the listening sockets of every process of
its process groups are listed. On the previous main this failed twice over: Label Studio listened
on 0.0.0.0 (its `--host` names the server in URLs, `--internal-host` is the bind address), and
Airflow's scheduler and triggerer ran their log servers on every interface (:8793, :8794)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port
from tests.test_browser import browser  # noqa: F401  (the headless Chromium fixture)

pytestmark = pytest.mark.slow


def stack_processes(run_dir: Path) -> list[psutil.Process]:
    """Every process in the process groups bin/stack started (setsid: pid = pgid)."""
    groups = {int(p.read_text().split()[0]) for p in run_dir.glob("*.pid")}
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in groups:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def listeners(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on."""
    found = set()
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((" ".join(p.cmdline()[:3])[-60:], c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The local stack as `make up` starts it, in a temporary VLOOP_HOME on free ports; stopped
    (by PID, `bin/stack down`) after the module's tests."""
    home = tmp_path_factory.mktemp("stack") / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "VLOOP_", "LABEL_STUDIO_"))}
    env.update(VLOOP_HOME=str(home), VLOOP_BASE_MODEL=str(tiny_model_dir), VLOOP_LABEL_STUDIO_PORT=str(free_port()),
               VLOOP_SERVING_PORT=str(free_port()), VLOOP_AIRFLOW_PORT=str(free_port()))
    try:
        up = subprocess.run([str(ROOT / "bin" / "stack"), "up"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, home
    finally:
        subprocess.run([str(ROOT / "bin" / "stack"), "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def test_make_up_listens_on_loopback_only(stack):
    env, home = stack
    # The API server answering comes before the scheduler and triggerer start (and, on the
    # previous main, their log servers): wait until both run, then a little longer.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = " ".join(" ".join(p.cmdline()) for p in stack_processes(home / "run") if p.is_running())
        if "scheduler" in names and "triggerer" in names:
            break
        time.sleep(2)
    time.sleep(20)
    found = listeners(stack_processes(home / "run"))
    ports = {port for _, _, port in found}
    for name in ("VLOOP_LABEL_STUDIO_PORT", "VLOOP_SERVING_PORT", "VLOOP_AIRFLOW_PORT"):
        assert int(env[name]) in ports, (name, found)  # the listing sees every service
    wide = sorted(f for f in found if f[1] not in ("127.0.0.1", "::1"))
    assert not wide, f"listening beyond loopback: {wide}"


def _login(browser, stack) -> tuple[str, str]:
    """Log in to Airflow's UI as admin (the password the stack generated); the base URL and the
    session's API token."""
    import json

    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    env, home = stack
    base = f"http://127.0.0.1:{env['VLOOP_AIRFLOW_PORT']}"
    password = json.loads((home / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    wait = WebDriverWait(browser, 90)
    browser.get(base + "/")

    def login_form(driver):
        # "/" redirects to the login page, in the page's own script too: a lookup that lands on a
        # navigation is aborted by Chrome ("aborted by navigation"), which means look again.
        try:
            return EC.presence_of_element_located((By.NAME, "username"))(driver)
        except WebDriverException as e:
            if "aborted by navigation" in str(e):
                return False
            raise

    wait.until(login_form).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda d: "/auth/login" not in d.current_url)
    return base, browser.get_cookie("_token")["value"]


def _scheduler_took_in(home: Path, dag_id: str, task_id: str) -> bool:
    """Whether the scheduler (its log, in `make up`'s airflow.log) has processed the executor's
    report that the task's process ended (a deferral ends the process with "success")."""
    log = home / "log" / "airflow.log"
    key = f"for task instance TaskInstanceKey(dag_id='{dag_id}', task_id='{task_id}'"
    return log.exists() and any("Received executor event with state success" in line and key in line
                                for line in log.read_text(errors="replace").splitlines())


def test_an_approver_promotes_the_canary_in_required_actions(stack, browser):
    """Manual approval under the real scheduler, answered in a real browser: a canary clearly
    better at its last stage, `vloop_promotion_approval` = manual, a canary_rollout look; the
    person finds the request in Required Actions with the experiment's figures, approves with a
    comment, and the canary becomes champion with the approver named in the registry."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_approval import live_canary
    from vloop.learn.registry import Registry
    from vloop.store.lake import open_lake

    env, home = stack
    lake = open_lake(f"file://{home}/lake")
    started = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=4)
    # 3 hours of clearly better traffic at 50%, the first of two stages (50%, 100%).
    reg, champ, cand = live_canary(lake, t0=started, names=("old-champion", "better"))
    base, token = _login(browser, stack)
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    api.post("/api/v2/variables", json={"key": "vloop_promotion_approval", "value": "manual"}).raise_for_status()
    try:
        api.post("/api/v2/dags/canary_rollout/dagRuns", json={
            "logical_date": None, "conf": {"min_hours": 2, "min_requests": 100, "max_hours": 12}}).raise_for_status()
        deadline, pending = time.monotonic() + 240, []
        while time.monotonic() < deadline and not pending:
            time.sleep(3)
            pending = api.get("/api/v2/dags/~/dagRuns/~/hitlDetails",
                              params={"response_received": "false"}).json()["hitl_details"]
        assert pending and pending[0]["subject"] == f"Promote {cand} to champion?", pending
        # The look's run ends, its note says why. The DAG's own schedule may have started a run too
        # (the stack unpauses it), whose note ("skipped" or another) can come first: wait for the
        # note of the run that asked.
        def asked(notes: list[str]) -> bool:
            return any(n.startswith(f"awaiting a person's approval (request ") and cand in n for n in notes)

        deadline, notes = time.monotonic() + 120, []
        while time.monotonic() < deadline and not asked(notes):
            notes = [r["note"] for r in api.get("/api/v2/dags/canary_rollout/dagRuns").json()["dag_runs"]
                     if r.get("note")]
            time.sleep(3)
        assert asked(notes), notes
        assert reg.serving_state().champion == champ  # nothing promoted while the person decides

        wait = WebDriverWait(browser, 90)
        browser.get(base + "/required_actions?response_received=false")
        wait.until(EC.element_to_be_clickable((By.LINK_TEXT, f"Promote {cand} to champion?"))).click()
        comment = wait.until(EC.presence_of_element_located((By.NAME, "element_comment")))
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "always-valid interval" in page and "acceptance" in page  # the figures the person decides on
        if os.environ.get("VLOOP_SCREENSHOTS"):
            browser.save_screenshot(str(Path(os.environ["VLOOP_SCREENSHOTS"]) / "airflow-required-action.png"))
        comment.send_keys("figures look right")
        # A person reads the figures first. An answer before the scheduler has taken in the paused
        # task's exit races Airflow itself: it then marks the resumed task up for retry and the
        # retry asks again (its log: "Executor ... reported that the task instance ... [queued]
        # finished with state success"). So the answer waits until the scheduler's log shows that
        # exit (seconds; a person reading the figures takes longer).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _scheduler_took_in(home, "promotion_approval", "approval"):
            time.sleep(1)
        assert _scheduler_took_in(home, "promotion_approval", "approval"), "the scheduler never saw the task pause"
        browser.find_element(By.XPATH, "//button[normalize-space()='Approve']").click()

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and reg.serving_state().champion != cand:
            time.sleep(3)
        state = reg.serving_state()
        assert state.champion == cand and state.canary is None, state
        answer = [e for e in reg.history() if e["kind"] == "promotion_approval"][-1]
        assert answer["actor"] == "admin" and "approved by admin: figures look right" in answer["reason"], answer
    finally:
        api.delete("/api/v2/variables/vloop_promotion_approval")


def test_an_operator_logs_in_and_finds_the_loop_in_the_airflow_ui(stack, browser):
    """In a real browser against the running stack: Airflow's login, the vloop entry in its
    navigation, the vloop page inside the UI, with the champion and the live canary's figures;
    DAGs are not paused (the loop runs once the stack is up). With VLOOP_SCREENSHOTS=DIR the
    pages are saved there (the README's screenshots)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_uipage import _loop_state
    from vloop.store.lake import open_lake

    env, home = stack
    # A champion, a canary live since three hours ago, a rejected round, a daily report.
    started = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    refs, day = _loop_state(open_lake(f"file://{home}/lake"), t0=started)
    shots = os.environ.get("VLOOP_SCREENSHOTS")
    wait = WebDriverWait(browser, 90)
    base, token = _login(browser, stack)
    # The plugin's navigation entry, as the UI renders it from /api/v2/plugins.
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "a[href$='plugin/vloop']")))

    browser.get(base + "/plugin/vloop")  # the page inside Airflow's UI: an iframe on /vloop/
    frame = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "iframe[src*='/vloop/']")))
    if shots:
        time.sleep(3)
        browser.save_screenshot(str(Path(shots) / "airflow-vloop-page.png"))
    browser.switch_to.frame(frame)
    body = wait.until(EC.presence_of_element_located((By.TAG_NAME, "body")))
    wait.until(lambda d: refs[1] in body.text)
    assert refs[0] in body.text and "canary" in body.text.lower()
    browser.switch_to.default_content()

    # The loop's DAGs run once the stack is up: none is paused.
    browser.get(base + "/dags")
    import httpx

    dags = httpx.get(base + "/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["dags"]
    loop = {d["dag_id"]: d["is_paused"] for d in dags}
    assert loop.keys() >= {"feedback_daily", "retrain_biweekly", "canary_rollout", "privacy_maintenance"}, loop
    assert not any(loop.values()), loop
    # Unpaused, retrain_biweekly's first scheduled run starts at once; on a lake without labels it
    # skips, and its last task writes why into the run's note through the API (the "vloop" user).
    deadline, note = time.monotonic() + 300, None
    while time.monotonic() < deadline and not note:
        runs = httpx.get(base + "/api/v2/dags/retrain_biweekly/dagRuns", headers={"Authorization": f"Bearer {token}"},
                         timeout=30).json()["dag_runs"]
        note = next((r["note"] for r in runs if r.get("note")), None)
        time.sleep(5)
    assert note and note.startswith("skipped: only 0 new labels"), runs
    # That run's "vloop report" tab (an external view on every run): why it registered nothing.
    import urllib.parse

    run_id = next(r["dag_run_id"] for r in runs if r.get("note"))
    browser.get(f"{base}/dags/retrain_biweekly/runs/{urllib.parse.quote(run_id, safe='')}/plugin/vloop_run")
    frame = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "iframe[src*='/vloop/runs/retrain_biweekly/']")))
    browser.switch_to.frame(frame)
    body = wait.until(EC.presence_of_element_located((By.TAG_NAME, "body")))
    wait.until(lambda d: "registered no adapter" in body.text)
    browser.switch_to.default_content()
    if shots:  # the loop's lineage in the Assets view
        browser.get(base + "/assets")
        wait.until(EC.presence_of_element_located((By.PARTIAL_LINK_TEXT, "vloop_labels")))
        time.sleep(2)
        browser.save_screenshot(str(Path(shots) / "airflow-assets.png"))
    if shots:
        time.sleep(3)
        browser.save_screenshot(str(Path(shots) / "airflow-dags.png"))
