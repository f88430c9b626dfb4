"""The annotation app in a real browser: headless Chromium (the system's, through selenium) clicks through a curation
pass and an A/B task with the keyboard, and the answers land on disk. Screenshots of each page go to
``$EMU_SCREENSHOTS`` (default: the test's tmp folder)."""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.test_annotate import ab_task, curation_task  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve():
    import uvicorn

    from emu.annotate.app import create_app

    servers = []

    def start(task, token=None) -> str:
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(task, token), host="127.0.0.1", port=port, log_level="error"))
        threading.Thread(target=server.run, daemon=True).start()
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for s in servers:
        s.should_exit = True


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _shots(tmp_path) -> Path:
    folder = Path(os.environ.get("EMU_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait(predicate, timeout=10.0):
    """Poll ``predicate`` until it holds. An element found on a page that is being replaced (the name form posts and
    the page reloads) goes stale between finding it and reading it: that is "not yet", and is asked again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            if predicate():
                return True
        except (StaleElementReferenceException, NoSuchElementException):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def _progress(browser) -> str:
    return browser.find_element("id", "progress").text


def test_a_curation_pass_in_the_browser(curation_task, serve, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.keys import Keys

    url = serve(curation_task, token="s3cret")
    browser.get(f"{url}/?token=s3cret")
    browser.save_screenshot(str(_shots(tmp_path) / "annotate_index.png"))
    browser.find_element("id", "rater").send_keys("ana", Keys.ENTER)  # the name form
    _wait(lambda: _progress(browser) == "0 of 4")
    _wait(
        lambda: browser.execute_script(
            "const i = document.getElementById('candidate'); return i.complete && i.naturalWidth > 0"
        )
    )
    browser.save_screenshot(str(_shots(tmp_path) / "annotate_curation.png"))
    body = browser.find_element("tag name", "body")
    for i in range(4):  # composition and colour ticked, keep; the last one rejected
        body.send_keys("1", "3", "k" if i < 3 else "r")
        _wait(lambda i=i: _progress(browser) == f"{i + 1} of 4")
    _wait(lambda: browser.find_element("id", "done").is_displayed())
    rows = [json.loads(x) for x in (curation_task / "app_labels.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["annotator"] for r in rows} == {"ana"}
    assert all(r["composition"] == 1 and r["color_contrast"] == 1 and r["lighting"] == 0 for r in rows)
    assert sorted(r["keep"] for r in rows) == [0, 1, 1, 1]


def test_an_ab_task_in_the_browser(ab_task, serve, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.keys import Keys

    url = serve(ab_task)
    browser.get(f"{url}/rate?rater=bo")
    _wait(lambda: _progress(browser) == "0 of 8")
    assert not browser.find_element("id", "prompt").is_displayed()  # appeal: the prompt is hidden
    _wait(lambda: browser.execute_script("return document.getElementById('right').naturalWidth > 0"))
    browser.save_screenshot(str(_shots(tmp_path) / "annotate_ab.png"))
    body = browser.find_element("tag name", "body")
    keys = [Keys.ARROW_LEFT, "b", "t", "a", Keys.ARROW_RIGHT, "t", "a", "b"]
    for i, key in enumerate(keys):
        body.send_keys(key)
        _wait(lambda i=i: _progress(browser) == f"{i + 1} of 8")
    _wait(lambda: browser.find_element("id", "done").is_displayed())
    rows = [json.loads(x) for x in (ab_task / "votes.jsonl").read_text().splitlines()]
    expected = ["left", "right", "tie", "left", "right", "tie", "left", "right"]
    assert [r["choice"] for r in rows] == expected and {r["rater"] for r in rows} == {"bo"}
    assert {r["check"] for r in rows} == {None, "repeat", "broken"}
