"""The disposable browser: a warm Chromium in a snapshot, a fresh machine with it per test.

Owns the browser guest's configuration (a ``debian:`` image with Debian's ``chromium``, the
``browser_memory`` setting), its prepare step (start Chromium headless with remote debugging,
wait for the DevTools endpoint, load a blank page so the first-run work is in the snapshot),
the :class:`Browser` a test gets (``cdp_url`` for Playwright's ``connect_over_cdp``, ``vm``,
``page_url``), and the failure artefacts (a PNG screenshot of the page, the browser's console
log). The DevTools endpoint and the pages the test serves travel over the agent channel
(``vm.forward`` / ``vm.expose``): the guest needs no network device.

Headless Chromium binds its DevTools port to the guest's 127.0.0.1 whatever it is told, which is
exactly where the agent's forwarder connects. Chromium builds the WebSocket URL it advertises
from the request's ``Host`` header, so clients on the forwarded host port get URLs that work.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Browser", "BrowserError", "BROWSER_PACKAGES", "DEVTOOLS_PORT", "prepare_browser"]

DEVTOOLS_PORT = 9222
PROFILE = "/tmp/ignition-browser-profile"
LOG = "/var/log/ignition-chromium.log"
BROWSER_PACKAGES = ("chromium", "fonts-dejavu-core")
# Marks the browser guest's configuration: its snapshot holds a running browser, so it must
# never be shared with a plain Debian guest of the same packages.
ROLE_ARG = "ignition.role=browser"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root in a throwaway VM: the sandbox would refuse to start
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    # no network here: without these, Chromium retries connections to Google endlessly
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-breakpad",
    "--metrics-recording-only",
    # less background work: a quiet browser snapshots (and restores) cheaply
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-client-side-phishing-detection",
    "--disable-component-extensions-with-background-pages",
    "--disable-features=Translate,MediaRouter,OptimizationHints,DialMediaRouteProvider",
    "--disable-hang-monitor",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--password-store=basic",
    "--use-mock-keychain",
    "--mute-audio",
    f"--remote-debugging-port={DEVTOOLS_PORT}",
    f"--user-data-dir={PROFILE}",
    # page console messages go to the log (read for failure reports)
    "--enable-logging=stderr",
    "--v=0",
)


class BrowserError(Exception):
    """The guest's browser did not start, or its DevTools endpoint does not answer."""


def _http(port: int, path: str, timeout: float, method: str = "GET") -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": f"127.0.0.1:{port}"})
        resp = conn.getresponse()
        body = resp.read(1 << 20)
        if resp.status != 200:
            raise BrowserError(f"DevTools {method} {path}: HTTP {resp.status}: {body[:200]!r}")
        return body
    finally:
        conn.close()


def _http_json(port: int, path: str, timeout: float, method: str = "GET") -> Any:
    body = _http(port, path, timeout, method)
    try:
        return json.loads(body)
    except ValueError:
        raise BrowserError(f"DevTools {method} {path}: not JSON: {body[:200]!r}") from None


def wait_devtools(port: int, timeout: float, what: str) -> dict[str, Any]:
    """Poll ``/json/version`` on the host port ``port`` until it answers (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return _http_json(port, "/json/version", timeout=min(5.0, timeout))
        except (OSError, ValueError, BrowserError, http.client.HTTPException) as e:
            last = e
            time.sleep(0.1)
    raise BrowserError(
        f"{what}: Chromium's DevTools endpoint did not answer within {timeout:g} s ({last})"
    )


def _cpu_busy_idle(vm: Any) -> tuple[int, int]:
    fields = vm.read_file("/proc/stat").split(b"\n", 1)[0].split()[1:]
    values = [int(x) for x in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, idle


def wait_quiet(vm: Any, timeout: float, window: float = 2.0, idle_share: float = 0.9) -> float:
    """Wait until the guest's CPUs were ``idle_share`` idle over a ``window`` (or ``timeout``);
    returns the last window's idle share."""
    deadline = time.monotonic() + timeout
    share = 0.0
    busy0, idle0 = _cpu_busy_idle(vm)
    while time.monotonic() < deadline:
        time.sleep(window)
        busy1, idle1 = _cpu_busy_idle(vm)
        total = (busy1 - busy0) + (idle1 - idle0)
        share = (idle1 - idle0) / total if total > 0 else 1.0
        if share >= idle_share:
            return share
        busy0, idle0 = busy1, idle1
    return share


def prepare_browser(vm: Any, timeout: float = 300.0) -> None:
    """Start Chromium in the booted browser guest, wait for DevTools, warm it up; ``timeout``
    seconds for all of it (the quiet wait gets what the start left)."""
    deadline = time.monotonic() + timeout
    argv = " ".join(CHROMIUM_FLAGS)
    # No D-Bus in the guest: without this Chromium keeps retrying the system and session buses.
    env = "DBUS_SESSION_BUS_ADDRESS=disabled: DBUS_SYSTEM_BUS_ADDRESS=disabled:"
    vm.run(f"rm -rf {PROFILE}; {env} nohup chromium {argv} about:blank > {LOG} 2>&1 &", timeout=60)
    port = vm.forward(DEVTOOLS_PORT)
    try:
        wait_devtools(port, timeout, "starting the browser guest")
        # A real page load, so the renderer and its caches are warm in the snapshot.
        target = _http_json(port, "/json/new?about:blank", timeout=60, method="PUT")
        time.sleep(0.5)
        _http(port, f"/json/close/{target['id']}", timeout=30)  # answers "Target is closing"
        # Snapshot a quiet browser: start-up work left running would resume in every restore.
        wait_quiet(vm, max(10.0, deadline - time.monotonic()))
    except BrowserError as e:
        log = vm.run(f"tail -c 4000 {LOG}", timeout=30).stdout
        raise BrowserError(f"{e}\n--- chromium log (tail) ---\n{log}") from None
    finally:
        close = getattr(vm, "unforward", None)
        if close is not None:
            close(port)


@dataclass
class Browser:
    """A restored browser guest. ``cdp_url`` takes Playwright's ``connect_over_cdp``."""

    vm: Any
    cdp_url: str
    port: int

    def page_url(self, host_port: int, path: str = "/") -> str:
        """Expose the host's ``127.0.0.1:host_port`` to the guest; the URL the browser opens."""
        guest_port = host_port if host_port != DEVTOOLS_PORT else host_port + 1
        self.vm.expose(host_port, guest_port)
        if not path.startswith("/"):
            path = "/" + path
        return f"http://127.0.0.1:{guest_port}{path}"

    def version(self) -> dict[str, Any]:
        return _http_json(self.port, "/json/version", timeout=10)

    def screenshot(self, timeout: float = 20.0) -> bytes:
        """A PNG of the first page target (CDP ``Page.captureScreenshot``)."""
        targets = _http_json(self.port, "/json/list", timeout=timeout)
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if not pages:
            raise BrowserError("no page is open in the browser")
        ws = _WebSocket(self.port, _ws_path(pages[0]["webSocketDebuggerUrl"]), timeout)
        try:
            reply = ws.call("Page.captureScreenshot", {"format": "png"})
        finally:
            ws.close()
        return base64.b64decode(reply["data"])

    def console_log(self, max_bytes: int = 16000) -> str:
        """The end of Chromium's log: page console messages are ``CONSOLE`` lines there."""
        return self.vm.run(["tail", "-c", str(max_bytes), LOG], timeout=30).stdout


def _ws_path(url: str) -> str:
    # ws://127.0.0.1:PORT/devtools/page/ID -> /devtools/page/ID
    rest = url.split("://", 1)[-1]
    return "/" + rest.split("/", 1)[1] if "/" in rest else "/"


class _WebSocket:
    """The least of RFC 6455 a CDP call needs: one client connection, text frames, masking."""

    MAX_MESSAGE = 64 << 20  # a screenshot of a large page is a few MiB of base64

    def __init__(self, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk or len(head) > 65536:
                raise BrowserError("DevTools WebSocket handshake failed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise BrowserError(f"DevTools WebSocket handshake: {status.decode(errors='replace')}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 1

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise BrowserError("DevTools WebSocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(head + mask + masked)

    def recv(self) -> str:
        parts: list[bytes] = []
        total = 0
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._recv_exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._recv_exact(8))
            total += n
            if total > self.MAX_MESSAGE:
                raise BrowserError("DevTools message larger than 64 MiB")
            payload = self._recv_exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise BrowserError("DevTools WebSocket closed by the browser")
            if opcode in (0x9, 0xA):  # ping/pong: not part of a message
                total -= n
                continue
            parts.append(payload)
            if b0 & 0x80:
                return b"".join(parts).decode("utf-8", errors="replace")

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        cid = self.next_id
        self.next_id += 1
        self.send(json.dumps({"id": cid, "method": method, "params": params or {}}))
        # each recv has the socket's timeout; events may keep coming, so the call has its own
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise BrowserError(f"CDP {method}: no answer within {timeout:g} s")
            msg = json.loads(self.recv())
            if msg.get("id") == cid:
                if "error" in msg:
                    raise BrowserError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def open_browser(vm: Any, timeout: float = 60.0) -> Browser:
    """The :class:`Browser` of a restored browser guest: DevTools forwarded to the host."""
    port = vm.forward(DEVTOOLS_PORT)
    wait_devtools(port, timeout, "the restored browser guest")
    return Browser(vm=vm, cdp_url=f"http://127.0.0.1:{port}", port=port)


Preparer = Callable[[Any], None]


def _preparer(prepare_timeout: float | None) -> Preparer:
    """:func:`prepare_browser` within the session's ``prepare_timeout`` (less a margin, so that
    a browser that never answers is this clear error rather than the prepare watchdog's)."""
    limit = 3600.0 if prepare_timeout is None else max(60.0, prepare_timeout - 30.0)
    return lambda vm: prepare_browser(vm, timeout=limit)


# ----------------------------------------------------------------------------- fixtures

import pytest  # noqa: E402  (the fixtures below; the module above needs no pytest)

BROWSERS_KEY = pytest.StashKey[list]()


class BrowserFactory:
    """``factory(**config) -> Browser``: each call a fresh browser guest; closed at teardown.

    Keywords are the marker/factory settings (``memory=``, ``packages=`` for extra packages
    beside Chromium, ``reset=``, ...); the defaults make a ``debian:bookworm`` guest with
    Debian's ``chromium`` and ``browser_memory`` of RAM.
    """

    def __init__(self, session: Any, request: pytest.FixtureRequest) -> None:
        self._session = session
        self._request = request
        self._held: list[tuple[Any, Any]] = []

    def __call__(self, **config: Any) -> Browser:
        from pytest_ignition import config as cfgmod
        from pytest_ignition import fixtures as fx

        s = self._session.settings
        extra = cfgmod.parse_packages(config.pop("packages", ()))
        wanted: dict[str, Any] = {
            "image": "debian:bookworm",
            "init": "agent",
            "memory": f"{s.browser_memory_mib}M",
            **config,
        }
        wanted["packages"] = ",".join(sorted(set(BROWSER_PACKAGES) | set(extra)))
        args = str(wanted.pop("kernel_args", "")).strip()
        wanted["kernel_args"] = f"{ROLE_ARG} {args}".strip()
        overrides = cfgmod.parse_overrides(wanted, where="ignition_browser")
        vmcfg, reset = self._session.vm_config(overrides)
        self._session.preparers[vmcfg.key()] = _preparer(s.prepare_timeout)
        snap = self._session.snapshot_for(vmcfg)
        pool = self._session.pool(snap, reset)
        vm, seconds = fx._map_restore_error(lambda: pool.acquire(prefetch=True))
        self._session.apply_test_limits(vm, overrides, "ignition_browser")
        self._held.append((vm, pool))
        fx._record_restore(self._request, seconds)
        n = len(self._held)
        fx._track(self._request, "ignition_browser" + (f" #{n}" if n > 1 else ""), vm)
        failure = None
        try:
            browser = open_browser(vm)
        except BrowserError as e:
            failure = f"pytest-ignition: {e}"
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        self._request.node.stash.setdefault(BROWSERS_KEY, []).append(browser)
        return browser

    def close(self) -> None:
        for vm, pool in self._held:
            self._session.release(vm, pool)
        self._held.clear()


@pytest.fixture
def ignition_browser_factory(request: pytest.FixtureRequest, _ignition_session: Any) -> Any:
    """Make browsers: ``ignition_browser_factory(memory="3G")`` -> :class:`Browser`."""
    factory = BrowserFactory(_ignition_session, request)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def ignition_browser(ignition_browser_factory: BrowserFactory) -> Browser:
    """A fresh machine with Chromium already started: ``.cdp_url``, ``.vm``, ``.page_url()``."""
    return ignition_browser_factory()


def failure_sections(item: pytest.Item, directory: Any) -> list[tuple[str, str]]:
    """Report sections for a failed test's browsers: the page's PNG (saved under
    ``directory``; the section names the file) and the end of the browser's console log."""
    out: list[tuple[str, str]] = []
    for i, browser in enumerate(item.stash.get(BROWSERS_KEY, [])):
        label = "ignition_browser" + (f" #{i + 1}" if i else "")
        try:
            png = browser.screenshot()
            os.makedirs(directory, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in item.nodeid)[-150:]
            path = os.path.join(os.fspath(directory), f"{safe}-{i + 1}.png")
            with open(path, "wb") as f:
                f.write(png)
            out.append((f"{label}: screenshot", f"{path} ({len(png)} bytes PNG)"))
        except Exception as e:  # a dead browser must not hide the test's own failure
            out.append((f"{label}: screenshot", f"(unavailable: {e})"))
        try:
            out.append((f"{label}: console log", browser.console_log()[-4000:] or "(empty)"))
        except Exception as e:
            out.append((f"{label}: console log", f"(unavailable: {e})"))
    return out
