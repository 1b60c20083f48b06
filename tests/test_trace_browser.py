"""The trace page in a real browser: Debian's headless Chromium driven by selenium (no Selenium Manager, no network).

Skips when Chromium or ChromeDriver is missing, unless NABLA_LC_REQUIRE_BROWSER is set (CI), where it fails instead.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nabla_lc import Result, Stats
from nabla_lc.engine.trace import PositionRecord
from nabla_lc.trace_view import render_trace, token_pieces

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "sudo apt-get install chromium chromium-driver (or: bash .ci/setup test)"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)
EVIL = "<script>document.title='pwned'</script>"


def _unavailable(why: str) -> None:
    if os.environ.get("NABLA_LC_REQUIRE_BROWSER"):
        pytest.fail(f"{why}; NABLA_LC_REQUIRE_BROWSER is set, so the browser test must run. Install: {INSTALL}")
    pytest.skip(f"{why}; install: {INSTALL}")


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """Headless Chromium with a fresh profile; always quit."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    if missing:
        _unavailable(f"{' and '.join(missing)} not found")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.selenium_manager import SeleniumManager
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")

    def no_manager(*_a, **_k):  # why: Selenium Manager downloads drivers and browsers; this test must use Debian's
        raise AssertionError("Selenium Manager was called")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,1000")
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        browser.set_page_load_timeout(30)
        yield browser
    finally:
        browser.quit()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _text_nodes(browser, element) -> str:
    """The element's own text (its direct text nodes: the token, without the position number in <sup>)."""
    return browser.execute_script(
        "return Array.from(arguments[0].childNodes).filter(n => n.nodeType === 3).map(n => n.data).join('')", element
    )


@pytest.mark.real_model
def test_marked_positions_of_a_real_solve_render_visibly(driver, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    import nabla_lc.trace_view as trace_view
    from nabla_lc.cli import main

    captured = {}
    write_trace = trace_view.write_trace

    def capture(result, decode, path, **kw):  # why: the page comes from the CLI, the expected tokens from its Result
        captured.update(result=result, decode=decode)
        return write_trace(result, decode, path, **kw)

    monkeypatch.setattr(trace_view, "write_trace", capture)
    page = tmp_path / "trace.html"
    code = main(["solve", "What is 7 + 5?", "--reward", "judge", "--max-new-tokens", "12", "--n", "2",
                 "--grad-threshold", "0", "--dto-steps", "3", "--trace", str(page)])
    assert code == 0 and page.is_file()
    result, decode = captured["result"], captured["decode"]
    pieces, shown, room = token_pieces(result.token_ids, decode), [], len(result.text)
    for piece in pieces:  # the page cuts the pieces at the text's end (a stop string), as render_trace does
        if room <= 0:
            break
        shown.append(piece[:room])
        room -= len(shown[-1])
    expected = [r for r in result.trace if r.index < len(shown)]
    assert expected and any(r.optimized for r in expected)

    driver.get(page.as_uri())
    assert driver.title.startswith("∇-Reasoner trace")
    shot = tmp_path / "trace.png"
    assert driver.save_screenshot(str(shot))
    width, height = _png_size(shot)
    assert width >= 400 and height >= 300 and shot.stat().st_size > 5_000

    marked = driver.find_elements(By.CSS_SELECTOR, "#response span[data-position]")
    assert len(marked) == len(expected)
    for element, record in zip(marked, expected):
        assert int(element.get_attribute("data-position")) == record.index
        assert element.is_displayed(), f"position {record.index} is not displayed"
        assert element.size["width"] > 0 and element.size["height"] > 0
        assert _text_nodes(driver, element) == shown[record.index]
        assert element.find_element(By.TAG_NAME, "sup").text == str(record.index)
        final = record.proposed_token if record.accepted else record.original_token
        assert result.token_ids[record.index] == final
    rows = driver.find_elements(By.CSS_SELECTOR, "#positions tr[class]")
    assert len(rows) == len(result.trace) and all(row.is_displayed() for row in rows)
    assert not driver.find_elements(By.TAG_NAME, "script")


def test_model_text_with_a_script_renders_as_text(driver, tmp_path):
    from selenium.webdriver.common.by import By

    # control: this browser does run an inline script on a file:// page, so the check below can fail
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><head><title>control</title></head><body>{EVIL}</body></html>", encoding="utf-8")
    driver.get(control.as_uri())
    assert driver.title == "pwned"

    pieces = ["Sure: ", "<script>", "document.title='pwned'", "</script>", " 42", "<img src=x onerror=\"document.title='img'\">"]
    text = "".join(pieces)
    trace = [
        PositionRecord(1, 1, "<script>", 1.2, 9.0, optimized=True, steps=3, proposed_token=2, proposed_text=EVIL,
                       reward_current=0.1, reward_proposal=0.2, accepted=False, top_after=[(EVIL, 0.5)]),
        PositionRecord(4, 4, " 42", 0.8, 3.0, optimized=True, steps=3, top_after=[(" 42", 0.9)]),
    ]
    result = Result(text, list(range(len(pieces))), "stop", Stats(), answer=EVIL, trace=trace)
    page = tmp_path / "evil.html"
    page.write_text(render_trace(result, lambda ids: "".join(pieces[i] for i in ids), title="trace", prompt=f"Say {EVIL}"),
                    encoding="utf-8")
    driver.get(page.as_uri())
    assert driver.title == "trace"
    assert not driver.find_elements(By.TAG_NAME, "script") and not driver.find_elements(By.TAG_NAME, "img")
    assert driver.find_elements(By.TAG_NAME, "table")[0].get_attribute("id") == "positions"  # no table closed early

    prompt = driver.find_element(By.CSS_SELECTOR, "div.text:not(#response)")
    assert prompt.is_displayed() and prompt.text == f"Say {EVIL}"
    response = driver.find_element(By.ID, "response")
    assert response.is_displayed()
    # the visible text is the model's text, with each marked position's number after it
    assert response.text == "Sure: <script>1document.title='pwned'</script> 424" + pieces[-1]
    literal = driver.find_element(By.ID, "p1")
    assert literal.is_displayed() and _text_nodes(driver, literal) == "<script>"
    cells = [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#positions tr.rejected td")]
    assert cells[2] == EVIL and cells[3].startswith(EVIL)
