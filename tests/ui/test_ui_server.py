"""`surgun ui` as a real server on loopback: gradio_client calls to `erase` and `probe`, and the page driven
in headless Chromium (Selenium). Skips, saying why, where gradio, Chromium or its driver is missing.

Screenshots go to $SURGUN_SCREENSHOTS (default: the test's temp folder) for a person to look at.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'surgun[ui]'")

FAST = dict(steps=8, blocks="cross-attn-kv", calibrate=False)  # no localization or calibration: seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("Lora")
    port = _free_port()
    env = dict(os.environ, SURGUN_CACHE="", GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1")
    log = open(lora_dir.parent / "server.log", "w")  # noqa: SIM115 (closed below)
    cmd = [sys.executable, "-m", "surgun_core.cli", "ui", "--port", str(port), "--lora-dir", str(lora_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
    if proc.poll() is not None:
        log.close()
        pytest.fail("surgun ui did not start:\n" + (lora_dir.parent / "server.log").read_text()[-3000:])
    yield {"url": url, "lora_dir": lora_dir, "proc": proc}
    proc.terminate()
    proc.wait(30)
    log.close()


def _erase_args(concepts, distractors="", preset="quick", steps=0, lr=0.0, rank=0, blocks="auto", calibrate=True,
                guidance=0.0, seed=0, lora_name="", robust=False):  # fmt: skip
    return [concepts, distractors, "object", preset, steps, lr, rank, blocks, calibrate, guidance, seed, lora_name,
            robust]  # fmt: skip


def _json(value):
    """A JSON output as a dict (gradio_client before 1.0, gradio 3's, hands it over as a file path)."""
    if isinstance(value, str) and Path(value).is_file():
        return json.loads(Path(value).read_text())
    return value


def test_gradio_client_erase_and_probe_return_scores(server):
    from gradio_client import Client

    client = Client(server["url"], verbose=False)
    status, gallery, scores, _curve, lora_path, snippet = client.predict(
        *_erase_args("circle", lora_name="api-circle", **FAST), api_name="/erase"
    )
    assert status.startswith("**Done**")
    scores = _json(scores)
    assert set(scores) >= {"erase", "retain", "h", "steps"} and scores["steps"] == 8
    assert Path(lora_path) == server["lora_dir"] / "api-circle.safetensors" and Path(lora_path).is_file()
    assert snippet == "<lora:api-circle:1>"
    if isinstance(gallery, str):  # gradio_client before 1.0: a folder of images and captions.json
        gallery = [p for p in Path(gallery).iterdir() if p.suffix != ".json"]
    assert len(gallery) == 10
    before, after, verdict = client.predict("a green circle", 5, 1.0, "", api_name="/probe")
    verdict = _json(verdict)
    assert Path(before).is_file() and Path(after).is_file()
    assert set(verdict) == {"before", "after", "before_shows_erased", "after_shows_erased"}
    # a LoRA file from the folder, and a bad path named in the error
    verdict2 = _json(client.predict("a green circle", 5, 1.0, lora_path, api_name="/probe")[2])
    assert verdict2 == {} or set(verdict2) == set(verdict)
    with pytest.raises(Exception, match="no file at"):
        client.predict("a green circle", 5, 1.0, "/nope.safetensors", api_name="/probe")
    with pytest.raises(Exception, match="name at least one concept"):
        client.predict(*_erase_args(""), api_name="/erase")
    # the audit endpoint on the latest erase: new phrasings, on the erased and on the base model (the control)
    status, grid, report = client.predict("", ["phrasings"], 0, api_name="/audit")
    report = _json(report)
    assert status.startswith("**Done**") and Path(grid).is_file()
    assert report["concept"] == "circle" and set(report["attacks"]) == {"phrasings"}
    assert 0 <= report["attacks"]["phrasings"]["recovery"] <= 1 and report["attacks"]["phrasings"]["control"] > 0.5


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    drv = _chrome()
    yield drv
    drv.quit()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("SURGUN_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(drv, predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # elements re-render while gradio updates them
            pass
        time.sleep(0.5)
    page = drv.find_element("tag name", "body").text[:1500]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page says: {page}")


def _type(drv, elem_id, text, tag="textarea, input"):
    """Replace the text of the first textarea/input inside the component with this elem_id."""
    el = next(e for t in tag.split(",") for e in drv.find_elements("css selector", f"#{elem_id} {t.strip()}"))
    el.clear()
    el.send_keys(str(text))


def _status(drv) -> str:
    return drv.find_element("css selector", "#surgun_status").text


def _open_advanced(drv):
    """Open the Advanced accordion (gradio 3 keeps its inputs in the page, hidden, while it is closed)."""

    def shown():
        return any(e.is_displayed() for e in drv.find_elements("css selector", "#surgun_steps input"))

    for head in drv.find_elements("xpath", "//*[normalize-space(text())='Advanced']"):  # the header, its label
        if shown():
            return
        if head.is_displayed():
            try:
                head.click()
                _wait(drv, shown, 3, "Advanced to open")
            except Exception:  # not the clickable header in this gradio version: try the next candidate
                continue
    assert shown(), "could not open the Advanced settings"


def test_browser_erase_gallery_scores_stop_and_bad_input(server, browser, shots):
    drv = browser
    drv.get(server["url"])
    _wait(drv, lambda: drv.find_element("css selector", "#surgun_train").is_displayed(), 60, "the page")
    drv.save_screenshot(str(shots / "ui-0-start.png"))

    # a bad input: no concept -> a readable error, nothing runs
    drv.find_element("css selector", "#surgun_train").click()
    _wait(drv, lambda: "name at least one concept" in drv.find_element("tag name", "body").text, 30, "the error")
    drv.save_screenshot(str(shots / "ui-1-empty-concept.png"))

    # erase from the browser: the gallery and the scores appear
    _type(drv, "surgun_concepts", "circle", "textarea")
    _open_advanced(drv)
    _type(drv, "surgun_steps", 8, "input")
    _type(drv, "surgun_blocks", "cross-attn-kv", "textarea, input")
    box = drv.find_element("css selector", "#surgun_calibrate input")
    if box.is_selected():
        box.click()
    drv.find_element("css selector", "#surgun_train").click()
    _wait(drv, lambda: _status(drv).startswith("Done"), 300, "the erase to finish")
    _wait(drv, lambda: len(drv.find_elements("css selector", "#surgun_gallery img")) >= 10, 30, "the gallery")
    body = drv.find_element("tag name", "body").text
    assert "erase" in _status(drv) and "retain" in _status(drv)
    assert '"retain"' in drv.find_element("css selector", "#surgun_scores").text or "retain" in body
    assert (server["lora_dir"] / "surgun-circle.safetensors").is_file()
    drv.save_screenshot(str(shots / "ui-2-erased.png"))

    # Stop: a long run ends at the next step, and says so
    _type(drv, "surgun_steps", 500, "input")
    _type(drv, "surgun_lora_name", "stopped-run", "textarea, input")
    drv.find_element("css selector", "#surgun_train").click()
    _wait(drv, lambda: _status(drv).startswith("training"), 300, "training to start")
    drv.find_element("css selector", "#surgun_stop").click()
    _wait(drv, lambda: _status(drv).startswith("Stopped"), 120, "the run to stop")
    assert not (server["lora_dir"] / "stopped-run.safetensors").exists()
    drv.save_screenshot(str(shots / "ui-3-stopped.png"))

    # Probe any prompt before and after (the latest delta is the first one: the stopped run saved nothing)
    _type(drv, "surgun_probe_prompt", "a yellow circle", "textarea, input")
    drv.find_element("css selector", "#surgun_probe").click()
    _wait(drv, lambda: drv.find_elements("css selector", "#surgun_probe_after img"), 120, "the probe images")
    drv.save_screenshot(str(shots / "ui-4-probe.png"))


def _open_accordion(drv, title: str, inside: str):
    """Open the accordion whose header starts with `title`, until the component `inside` (an elem_id) shows."""

    def shown():  # gradio 3 keeps a closed accordion's components hidden in the page, later versions leave them out
        return any(e.is_displayed() for e in drv.find_elements("css selector", f"#{inside}"))

    for head in drv.find_elements("xpath", f"//*[starts-with(normalize-space(text()), '{title}')]"):
        if shown():
            return
        if head.is_displayed():
            try:
                head.click()
                _wait(drv, shown, 3, f"{title} to open")
            except Exception:  # not the clickable header in this gradio version: try the next candidate
                continue
    assert shown(), f"could not open the {title} accordion"


def test_browser_audit_with_one_cheap_attack(server, browser, shots):
    """The Audit accordion on a LoRA file: only the phrasings attack (no optimisation), then the status, the grid
    and the report's recovery numbers in the page."""
    lora = next(iter(sorted(server["lora_dir"].glob("*.safetensors"))), None)
    if lora is None:  # run alone: erase first, through the API
        from gradio_client import Client

        erased = Client(server["url"], verbose=False).predict(*_erase_args("circle", lora_name="audit-circle", **FAST),
                                                              api_name="/erase")  # fmt: skip
        lora = Path(erased[4])
    drv = browser
    drv.get(server["url"])
    _wait(drv, lambda: drv.find_element("css selector", "#surgun_train").is_displayed(), 60, "the page")
    _open_accordion(drv, "Audit:", "surgun_audit")
    _type(drv, "surgun_audit_lora", str(lora), "textarea, input")
    for label in drv.find_elements("css selector", "#surgun_audit_attacks label"):
        box = label.find_element("css selector", "input")
        if box.is_selected() != (label.text.strip() == "phrasings"):
            label.click()
    checked = [lb.text.strip() for lb in drv.find_elements("css selector", "#surgun_audit_attacks label")
               if lb.find_element("css selector", "input").is_selected()]  # fmt: skip
    assert checked == ["phrasings"], checked
    drv.find_element("css selector", "#surgun_audit").click()

    def status() -> str:
        return drv.find_element("css selector", "#surgun_audit_status").text

    _wait(drv, lambda: status().startswith("Done"), 600, "the audit to finish")
    _wait(drv, lambda: drv.find_elements("css selector", "#surgun_audit_grid img"), 30, "the audit grid")
    report = drv.find_element("css selector", "#surgun_audit_report").text
    drv.execute_script("document.getElementById('surgun_audit_grid').scrollIntoView()")
    drv.save_screenshot(str(shots / "ui-5-audit.png"))
    # the status names the worst attack and its share; the report holds both models' recovery of it
    worst = re.search(r"worst attack (\w+) brings back (\d+)% of the concept", status())
    assert worst and worst.group(1) == "phrasings", status()
    for key in ("max_recovery", "recovery", "control", "phrasings"):
        assert key in report, (key, report[:500])
    numbers = {k: float(v) for k, v in re.findall(r'"?(max_recovery|recovery|control)"?\s*:\s*([0-9.]+)', report)}
    assert numbers["control"] > 0.5 and 0 <= numbers["recovery"] <= 1, numbers  # the base model draws circles
    assert round(100 * numbers["max_recovery"]) == int(worst.group(2))
