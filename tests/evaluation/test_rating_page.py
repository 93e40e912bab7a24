"""The rating page: its API (in-process) and a rater in headless Chromium."""

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tunesmith.human_eval.sheets import export_sheet, import_ratings
from tunesmith.human_eval.server import create_app, default_answers_path

ITEMS = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(3)]
OUTPUTS = {"base": ["no idea", "4", "7"], "tuned": ["0", "2", "6"]}


@pytest.fixture
def sheet(tmp_path):
    return export_sheet(ITEMS, OUTPUTS, tmp_path / "he", seed=5)


def test_api_saves_each_answer_at_once(sheet):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(sheet["sheet"]))
    data = client.get("/api/sheet").json()
    assert len(data["items"]) == 3 and data["criteria"] == ["relevance", "coherence", "correctness"]
    assert "base" not in json.dumps(data["items"]) and "tuned" not in json.dumps(data["items"])
    item = data["items"][0]["item_id"]
    r = client.post("/api/answers", json={"rater": "ann", "item_id": item, "scores": {"A": {"relevance": 4}}})
    assert r.status_code == 200 and r.json()["complete"] == []
    # on disk already, after one click
    answers = default_answers_path(sheet["sheet"])
    saved = [json.loads(x) for x in answers.read_text().splitlines()]
    assert saved[0]["scores"]["A"]["relevance"] == 4
    full = {lab: {"relevance": 5, "coherence": 4, "correctness": 3} for lab in ("A", "B")}
    r = client.post("/api/answers", json={"rater": "ann", "item_id": item, "scores": full, "comment": "ok"})
    assert r.json()["complete"] == [item]
    bad = client.post("/api/answers", json={"rater": "ann", "item_id": item, "scores": {"A": {"relevance": 6}}})
    assert bad.status_code == 422 and "1–5" in bad.json()["detail"]
    assert client.post("/api/answers", json={"rater": "", "item_id": item, "scores": {}}).status_code == 422
    # a new server on the same file sees the answers; they import like a filled sheet
    client2 = TestClient(create_app(sheet["sheet"]))
    assert client2.get("/api/answers", params={"rater": "ann"}).json()["complete"] == [item]
    ratings = import_ratings([answers], sheet["key"])
    assert len(ratings) == 6 and {r.rater for r in ratings} == {"ann"}
    assert {r.model for r in ratings} == {"base", "tuned"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(sheet):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(sheet["sheet"]), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    th.join(timeout=10)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.fixture
def browser(tmp_path):
    chrome = _chromium()
    if chrome is None or not Path("/usr/bin/chromedriver").exists():
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
def test_rater_scores_two_items_reloads_and_finds_them(server, browser, sheet):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(server + "/")
    wait.until(EC.element_to_be_clickable((By.ID, "rater"))).send_keys("rita")
    browser.find_element(By.ID, "start").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "position"), "Item 1 of 3"))
    chosen = {}
    for n, item_index in enumerate((0, 1)):
        wait.until(EC.text_to_be_present_in_element((By.ID, "position"), f"Item {item_index + 1} of 3"))
        for lab in ("A", "B"):
            for j, crit in enumerate(("relevance", "coherence", "correctness")):
                v = 1 + (n + j + (lab == "B")) % 5
                browser.find_element(By.ID, f"s-{lab}-{crit}-{v}").click()
                chosen[(item_index, lab, crit)] = v
        browser.find_element(By.ID, "comment").send_keys(f"note {item_index}")
        wait.until(EC.text_to_be_present_in_element((By.ID, "progress"), f"{n + 1} / 3 complete"))
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Saved"))
        time.sleep(0.5)  # let the debounced comment save land
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Saved"))
        browser.find_element(By.ID, "next").click()

    browser.refresh()
    # the rater is remembered; the page opens on the first unrated item with progress kept
    wait.until(EC.text_to_be_present_in_element((By.ID, "progress"), "2 / 3 complete"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "position"), "Item 3 of 3"))
    for item_index in (1, 0):
        browser.find_element(By.ID, "prev").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "position"), f"Item {item_index + 1} of 3"))
        for lab in ("A", "B"):
            for crit in ("relevance", "coherence", "correctness"):
                v = chosen[(item_index, lab, crit)]
                assert browser.find_element(By.ID, f"s-{lab}-{crit}-{v}").is_selected()
                others = [w for w in range(1, 6) if w != v]
                assert not any(browser.find_element(By.ID, f"s-{lab}-{crit}-{w}").is_selected() for w in others)
        assert browser.find_element(By.ID, "comment").get_attribute("value") == f"note {item_index}"

    ratings = import_ratings([default_answers_path(sheet["sheet"])], sheet["key"])
    assert len(ratings) == 2 * 2 * 3 and {r.rater for r in ratings} == {"rita"}
