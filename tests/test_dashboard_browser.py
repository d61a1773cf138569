"""The dashboard in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver (no browser download), against a real server with simulated devices.

An operator logs in with a token, watches a running campaign progress while devices update
(the page refreshes itself: a marker set in the page survives), pauses and resumes it, then
watches a key rotation spread over the fleet; a viewer is refused a campaign action; stored
HTML (a campaign name, a device's report) is shown as text and never runs.

``OTAGUARD_SCREENSHOTS=docs/screenshots`` also saves a PNG of each page there (the
screenshots in docs/dashboard.md); runs without it take none.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from otaguard.server.pki.ca import FleetCA
from tests.dashboard_support import Scene, scene
from tests.pg import fleet_ca, server_tls  # noqa: F401
from tests.support import missing

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.environ.get("OTAGUARD_SCREENSHOTS")
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
WAIT_S = 20


def _spki_pin(server_tls: Path) -> str:
    cert = x509.load_pem_x509_certificate((server_tls / "server.pem").read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def driver(server_tls: Path) -> Iterator[WebDriver]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        missing("Debian chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the test suite runs as root, where chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
        # The server certificate comes from a CA made for this test session. Instead of
        # turning certificate checks off, accept exactly this server key (its SPKI pin):
        # a browser talking to anything else still fails the TLS handshake.
        f"--ignore-certificate-errors-spki-list={_spki_pin(server_tls)}",
    ):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def sc(
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    driver: WebDriver,
) -> Iterator[Scene]:
    with scene(fleet_ca, server_tls, tmp_path, monkeypatch, devices=6) as s:
        driver.delete_all_cookies()
        yield s


def shot(d: WebDriver, name: str) -> None:
    """The whole page at 1280 px wide (only with OTAGUARD_SCREENSHOTS)."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        metrics = {"width": 1280, "deviceScaleFactor": 1, "mobile": False}
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": 500})
        height = int(d.execute_script("return document.documentElement.scrollHeight"))
        d.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {**metrics, "height": min(height, 2400)}
        )
        d.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def text(d: WebDriver, css: str) -> str:
    """The element's text, read in one step (the live part may be swapped in at any moment,
    which would make a held element reference stale)."""
    got = d.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css
    )
    assert got is not None, css
    return str(got).strip()


def act(d: WebDriver, css: str, keys: str | None = None) -> None:
    """Click (or type into) an element of the live part, finding it again if swapped."""
    for _ in range(5):
        try:
            e = d.find_element(By.CSS_SELECTOR, css)
            e.click() if keys is None else e.send_keys(keys)
            return
        except StaleElementReferenceException:  # swapped by the page's refresh: find it again
            continue
    raise AssertionError(f"{css} kept going stale")


def wait(d: WebDriver, cond: Callable[[WebDriver], object]) -> None:
    WebDriverWait(d, WAIT_S, poll_frequency=0.2).until(cond)


def log_in(d: WebDriver, sc: Scene, role: str) -> None:
    d.get(sc.url + "/ui/login")
    shot(d, "login") if role == "operator" else None
    d.find_element(By.ID, "token").send_keys(sc.token(role))
    d.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait(d, lambda d: d.current_url.endswith("/ui/"))
    assert f"({role})" in text(d, "#who")


def poll_all(sc: Scene, serials: list[str] | None = None) -> None:
    for serial in sorted(sc.fleet.devices) if serials is None else serials:
        sc.clock.advance(600)
        sc.fleet.devices[serial].poll()


def succeeded(sc: Scene, name: str = "spring-1") -> int:
    r = sc.api("viewer").get(f"/admin/v1/campaigns/{name}")
    return int(r.json()["counts"]["succeeded"])


def no_script_ran(d: WebDriver) -> None:
    assert d.execute_script("return typeof window.__pwned") == "undefined"
    with pytest.raises(NoAlertPresentException):
        d.switch_to.alert.text  # noqa: B018


def test_operator_watches_pauses_and_resumes_a_campaign(sc: Scene, driver: WebDriver) -> None:
    d = driver
    sc.campaign("spring-1", display="Spring security patch")
    log_in(d, sc, "operator")
    d.get(sc.url + "/ui/campaigns/spring-1")
    assert text(d, "#status") == "running" and text(d, "#succeeded") == "0"
    d.execute_script("window.__still_here = 1")  # gone if the page were reloaded
    poll_all(sc)  # phase 1: the devices of the first half's cohort update
    n1 = succeeded(sc)
    assert 0 < n1 < 6
    wait(d, lambda d: text(d, "#succeeded") == str(n1))
    assert d.execute_script("return window.__still_here") == 1  # updated in place
    sc.clock.advance(900)
    wait(d, lambda d: text(d, "#phase") == "2")  # the engine advanced; the page followed
    behind = [s for s, dev in sorted(sc.fleet.devices.items()) if dev.version == "1.0.0"]
    poll_all(sc, behind[1:])  # all but one: the campaign keeps running
    n2 = succeeded(sc)
    assert n2 > n1
    wait(d, lambda d: text(d, "#succeeded") == str(n2))
    shot(d, "campaign-running")

    act(d, "input[name=reason]", "INC-7: watching the canaries")
    act(d, "#pause")
    wait(d, lambda d: text(d, "#status") == "paused")
    assert "INC-7: watching the canaries" in text(d, "#pause-reason")
    assert sc.api("viewer").get("/admin/v1/campaigns/spring-1").json()["status"] == "paused"
    shot(d, "campaign-paused")
    act(d, "#resume")
    wait(d, lambda d: text(d, "#status") == "running")
    assert sc.api("viewer").get("/admin/v1/campaigns/spring-1").json()["status"] == "running"

    done = next(s for s, dev in sorted(sc.fleet.devices.items()) if dev.version == "1.1.0")
    sc.fleet.devices[done].poll()  # a check-in on the new firmware
    pages = {"overview": "/ui/", "campaigns": "/ui/campaigns", "fleet": "/ui/fleet",
             "device": f"/ui/devices/{done}", "releases": "/ui/releases"}  # fmt: skip
    for name, path in pages.items():
        d.get(sc.url + path)
        assert "Refused" not in d.title, path
        shot(d, name)


def test_rotation_propagation_is_watched_live(sc: Scene, driver: WebDriver) -> None:
    d = driver
    log_in(d, sc, "security-officer")
    sc.start_rotation()
    d.get(sc.url + "/ui/rotation")
    assert text(d, "#rot-state") == "started" and text(d, "#rot-fraction") == "0.0%"
    d.execute_script("window.__still_here = 1")
    serials = sorted(sc.fleet.devices)
    for serial in serials[:3]:
        sc.clock.advance(1200)
        sc.fleet.devices[serial].poll()  # check-in: fetches and installs key list v2
    wait(d, lambda d: text(d, "#rot-fraction") == "50.0%")
    assert text(d, "#rot-met") == "not met"
    for serial in serials[3:5]:
        sc.clock.advance(1200)
        sc.fleet.devices[serial].poll()
    wait(d, lambda d: text(d, "#rot-fraction") == "83.3%")
    assert text(d, "#rot-met") == "met"  # 75 % threshold
    assert d.execute_script("return window.__still_here") == 1
    assert "SN-005" in text(d, "#live")  # the one straggler is named
    shot(d, "rotation")
    d.get(sc.url + "/ui/audit")
    assert text(d, "#audit-status").startswith("Verified")
    shot(d, "audit")


def test_viewer_is_refused_and_stored_html_never_runs(sc: Scene, driver: WebDriver) -> None:
    d = driver
    sc.campaign("xss-1", display=XSS)
    sc.fleet.devices["SN-001"].updater.transport.report(
        {"state": "failed", "error": "E_SELF_TEST", "detail": XSS, "version": "1.0.0"}
    )
    log_in(d, sc, "viewer")
    for path in ("/ui/", "/ui/campaigns", "/ui/campaigns/xss-1", "/ui/devices/SN-001"):
        d.get(sc.url + path)
        no_script_ran(d)
    assert XSS in text(d, "#reports")  # shown as the text the device sent
    d.get(sc.url + "/ui/campaigns/xss-1")
    assert XSS in text(d, "#campaign-name")
    assert not d.find_elements(By.ID, "pause")  # no button for a viewer...
    # ...and a hand-made form with the viewer's own valid form token is refused by the server
    d.execute_script(
        """const f = document.createElement('form');
        f.method = 'post'; f.action = '/ui/campaigns/xss-1/pause';
        const t = document.createElement('input'); t.type = 'hidden'; t.name = 'csrf';
        t.value = document.querySelector('input[name=csrf]').value;
        f.appendChild(t); document.body.appendChild(f); f.submit();"""
    )
    wait(d, lambda d: d.find_elements(By.ID, "error-code"))
    assert text(d, "#error-code") == "E_FORBIDDEN"
    shot(d, "refused")
    assert sc.api("viewer").get("/admin/v1/campaigns/xss-1").json()["status"] == "running"
    no_script_ran(d)
