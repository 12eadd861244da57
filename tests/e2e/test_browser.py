"""The disposable browser on real guests: Debian's Chromium in a restored VM, driven by Playwright.

Each test gets a fresh machine whose Chromium was started (and warmed) before the snapshot;
Playwright connects over CDP through the agent channel and opens pages the test serves from
the host (``page_url`` exposes them to the guest). Nothing of one test's browser state
(cookies, localStorage) reaches the next; two browsers in one test are two machines; a page
that hangs its renderer is a clear error and the next test gets a working browser.
"""

from __future__ import annotations

import http.server
import io
import shutil
import threading
from collections.abc import Iterator

import pytest

from pytest_ignition._testing import require

QEMU = shutil.which("qemu-system-x86_64")
# Chromium under QEMU TCG is slow: these are deadlines, not speed expectations.
NAV_TIMEOUT_MS = 120_000

PAGES = {
    "/": b"""<!doctype html><html><head><title>ignition page</title></head>
<body style="background:#ff0000;margin:0">
<div id="out" style="width:100vw;height:100vh">not clicked</div>
<button id="b" onclick="document.getElementById('out').textContent='clicked ' + (6*7)">go</button>
</body></html>""",
    "/hang": b"""<!doctype html><html><body><script>while (true) {}</script></body></html>""",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = PAGES.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def playwright():
    require(QEMU, "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    require(shutil.which("mmdebstrap"), "mmdebstrap is not installed (apt-get install mmdebstrap)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        yield p


def _page(pw, browser):
    b = pw.chromium.connect_over_cdp(browser.cdp_url, timeout=NAV_TIMEOUT_MS)
    ctx = b.contexts[0] if b.contexts else b.new_context()
    page = ctx.new_page()
    page.set_default_timeout(NAV_TIMEOUT_MS)
    return b, page


def test_playwright_drives_the_restored_browser(playwright, ignition_browser, site) -> None:
    from PIL import Image

    b, page = _page(playwright, ignition_browser)
    page.goto(ignition_browser.page_url(site, "/"))
    assert page.title() == "ignition page"
    assert page.text_content("#out") == "not clicked"
    page.click("#b")
    assert page.text_content("#out") == "clicked 42"
    assert page.evaluate("() => navigator.userAgent").count("Chrome") == 1
    assert page.evaluate("() => 6 * 7") == 42
    png = page.screenshot()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = img.size
    assert w > 100 and h > 100
    r, g, bl = img.getpixel((w // 2, h // 2))
    assert r > 200 and g < 50 and bl < 50, (r, g, bl)  # the page's red background
    # the plugin's own CDP screenshot (used for failure reports) decodes too
    own = Image.open(io.BytesIO(ignition_browser.screenshot()))
    assert own.size[0] > 100
    b.close()


@pytest.mark.parametrize("round", [1, 2])
def test_cookies_and_local_storage_do_not_leak(playwright, ignition_browser, site, round) -> None:
    b, page = _page(playwright, ignition_browser)
    page.goto(ignition_browser.page_url(site, "/"))
    assert page.evaluate("() => document.cookie") == ""
    assert page.evaluate("() => localStorage.getItem('ignition')") is None
    page.evaluate(
        "(r) => { document.cookie = 'ignition=' + r + '; max-age=3600';"
        " localStorage.setItem('ignition', String(r)); }",
        round,
    )
    assert page.evaluate("() => document.cookie") == f"ignition={round}"
    assert page.evaluate("() => localStorage.getItem('ignition')") == str(round)
    assert len(b.contexts[0].cookies()) == 1
    b.close()


def test_two_browsers_in_one_test_are_independent(
    playwright, ignition_browser_factory, site
) -> None:
    one, two = ignition_browser_factory(), ignition_browser_factory()
    assert one.vm is not two.vm and one.cdp_url != two.cdp_url
    b1, p1 = _page(playwright, one)
    b2, p2 = _page(playwright, two)
    p1.goto(one.page_url(site, "/"))
    p2.goto(two.page_url(site, "/"))
    p1.evaluate("() => localStorage.setItem('who', 'one')")
    assert p2.evaluate("() => localStorage.getItem('who')") is None
    p1.click("#b")
    assert p2.text_content("#out") == "not clicked"
    b1.close()
    b2.close()


def test_a_hung_renderer_is_a_clear_error(playwright, ignition_browser, site) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    b, page = _page(playwright, ignition_browser)
    with pytest.raises(PlaywrightTimeout, match="Timeout"):
        page.goto(ignition_browser.page_url(site, "/hang"), timeout=15_000)
    b.close()


def test_the_next_test_gets_a_working_browser(playwright, ignition_browser, site) -> None:
    b, page = _page(playwright, ignition_browser)
    page.goto(ignition_browser.page_url(site, "/"))
    page.click("#b")
    assert page.text_content("#out") == "clicked 42"
    b.close()
