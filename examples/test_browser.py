"""A browser test as you would write it: every test gets its own fresh Chromium, in its own VM.

``ignition_browser`` is a Debian guest whose Chromium was started and warmed before the session
snapshot, so a test starts with a browser that is already up and has never seen another test.
Playwright connects over CDP (``pip install pytest-ignition[browser]``; Playwright's own browser
download is not needed), and ``page_url`` makes a server running on the host reachable from the
browser inside the guest.

The first run builds the browser image (Debian + chromium, a few minutes) and boots it once;
it needs ~2 GiB for the guest. Opt in, so that ``make demo`` stays quick::

    IGNITION_EXAMPLE_BROWSER=1 .venv/bin/python -m pytest examples/test_browser.py -v
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator

import pytest

if os.environ.get("IGNITION_EXAMPLE_BROWSER") != "1":
    pytest.skip(
        "the browser example builds a Chromium image and boots a 2 GiB guest: "
        "set IGNITION_EXAMPLE_BROWSER=1 to run it",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install 'pytest-ignition[browser]' for Playwright"
)

SHOP = b"""<!doctype html><html><head><title>tiny shop</title></head><body>
<p>items in cart: <span id="count">0</span></p>
<button id="add" onclick="
  const n = Number(localStorage.getItem('cart') || 0) + 1;
  localStorage.setItem('cart', n);
  document.getElementById('count').textContent = n;">add to cart</button>
<script>document.getElementById('count').textContent = localStorage.getItem('cart') || 0;</script>
</body></html>"""

# Chromium in a guest under QEMU TCG (no hardware virtualization) is slow: generous deadlines.
TIMEOUT_MS = 120_000


class Shop(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(SHOP)))
        self.end_headers()
        self.wfile.write(SHOP)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def shop_port() -> Iterator[int]:
    """The application under test, running on the host."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Shop)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(ignition_browser, shop_port):
    """A Playwright page in this test's own browser, on the shop's front page."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.connect_over_cdp(ignition_browser.cdp_url, timeout=TIMEOUT_MS)
        context = browser.contexts[0] if browser.contexts else browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(ignition_browser.page_url(shop_port))
        yield page
        browser.close()


def test_adding_to_the_cart_counts(page) -> None:
    page.click("#add")
    page.click("#add")
    assert page.text_content("#count") == "2"


def test_the_cart_starts_empty_in_every_test(page) -> None:
    # The previous test left 2 items in localStorage; this browser never saw that test.
    assert page.text_content("#count") == "0"
    page.click("#add")
    assert page.text_content("#count") == "1"
