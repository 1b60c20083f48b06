"""Screenshot a trace page (``nabla-lc solve ... --trace PAGE.html``) in headless Chromium: page in, PNG out.

    python docs/screenshot_trace.py /tmp/trace.html docs/img/trace-view.png

Uses Debian's chromium and chromium-driver (``apt-get install chromium chromium-driver``) through selenium, never
Selenium Manager; the page is self-contained, so nothing touches the network. The whole page is captured.
"""

from __future__ import annotations

import argparse
import base64
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
)


def screenshot(page: Path, out: Path, width: int = 1200, scale: float = 1.0, chromium: str = "/usr/bin/chromium",
               chromedriver: str = "/usr/bin/chromedriver") -> tuple[int, int]:
    """Write the full-page PNG of ``page`` to ``out``; returns its CSS size (width, height)."""
    with tempfile.TemporaryDirectory(prefix="nabla-shot-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},900")
        driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        try:
            driver.get(page.resolve().as_uri())
            size = driver.execute_script(
                "const e = document.documentElement; return [Math.ceil(e.scrollWidth), Math.ceil(e.scrollHeight)]"
            )
            shot = driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": scale}},
            )
        finally:
            driver.quit()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    return size[0], size[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the trace page (HTML)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200, help="viewport width in CSS pixels (default 1200)")
    parser.add_argument("--scale", type=float, default=1.0, help="device pixels per CSS pixel (default 1)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    w, h = screenshot(args.page, args.out, args.width, args.scale, args.chromium, args.chromedriver)
    print(f"{args.out}: {w}x{h} CSS px, {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
