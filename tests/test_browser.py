"""The trait report in a real browser: Debian's Chromium, headless, driven over the DevTools protocol.

The report is built from the contract-shaped fixture of tests/test_report.py
(one class is named ``<img src=x onerror=alert(1)>``), opened from a file://
URL, and checked the way a reader meets it: no console errors or uncaught
exceptions, no JavaScript dialog (the hostile name must not run), every image
decoded (naturalWidth > 0), the species names and the hostile name present as
text, and a full-page screenshot saved beside the test's files.

Chromium comes from scripts/install_chromium.sh when it is missing; the test
skips only when it is absent and cannot be installed.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from test_report import HOSTILE, make_report_fixture

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def chromium_binary() -> str | None:
    """Path of a Chromium binary, installing Debian's package when none is on PATH (None if impossible)."""
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    script = REPO / "scripts" / "install_chromium.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return None
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str, timeout: float = 30.0):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        """Send a command and wait for its result; events arriving meanwhile are kept in ``events``."""
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        self.events.append(message)
        if message.get("method") == "Page.javascriptDialogOpening":
            # record it, then dismiss so the page does not block
            self.ws.send(json.dumps({"id": 10**9, "method": "Page.handleJavaScriptDialog",
                                     "params": {"accept": False}}))

    def wait_for(self, event: str, timeout: float = 60.0) -> dict:
        """Wait for an event by name (or return it if it already arrived)."""
        for message in self.events:
            if message.get("method") == event:
                return message
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            if "id" in message:
                continue
            self._event(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(f"no {event} within {timeout} s")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with remote debugging; yields its DevTools HTTP endpoint."""
    pytest.importorskip("websocket", reason="websocket-client is in the [test] extras")
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed and scripts/install_chromium.sh could not install it")
    profile = tmp_path_factory.mktemp("chromium-profile")
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
               f"--user-data-dir={profile}", "--window-size=1280,1600", "about:blank"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None:
                pytest.fail(f"chromium exited with {process.returncode} before opening its debugging port")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its debugging port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> tuple[Path, list[str]]:
    from analysis.report import ReportTables, build_report

    base = tmp_path_factory.mktemp("browser-report")
    fixture = make_report_fixture(base)
    out = build_report(ReportTables.under(fixture["results_dir"], fixture["methods"]), fixture["root"],
                       fixture["config"], base / "report.html", progress=False)
    return out, fixture["names"]


def _page(endpoint: str) -> DevTools:
    with urllib.request.urlopen(f"{endpoint}/json/list", timeout=10) as response:
        targets = json.loads(response.read())
    page = next(t for t in targets if t.get("type") == "page")
    return DevTools(page["webSocketDebuggerUrl"])


def test_report_renders_in_chromium(browser, report_file, tmp_path):
    path, names = report_file
    tools = _page(browser)
    try:
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=path.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        time.sleep(0.5)  # let late console messages arrive
        state = tools.evaluate("""(() => {
            const images = Array.from(document.images);
            return {
              count: images.length,
              broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
              text: document.body.innerText,
              onerror: document.querySelectorAll('[onerror]').length,
              scripts: document.scripts.length,
              stray: images.filter(i => !i.src.startsWith('data:image/')).length,
              height: document.documentElement.scrollHeight,
            };
        })()""")
        metrics = tools.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000),
                                "scale": 1})
        screenshot = tmp_path / "report.png"
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        tools.call("Runtime.evaluate", expression="1")   # drain events that came with the screenshot
    finally:
        tools.close()

    errors = [e for e in tools.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    dialogs = [e for e in tools.events if e.get("method") == "Page.javascriptDialogOpening"]
    assert not errors, errors
    assert not dialogs, f"a JavaScript dialog opened: {dialogs}"
    assert state["count"] > 40
    assert not state["broken"], f"images that did not load: {state['broken']}"
    assert state["stray"] == 0 and state["scripts"] == 0 and state["onerror"] == 0
    for name in names:
        assert name in state["text"], f"species {name!r} not in the page text"
    assert HOSTILE in state["text"]          # shown literally, as text
    assert re.search(r"Species atlas", state["text"]) and "Look-alike pairs" in state["text"]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    print(f"screenshot: {screenshot} ({len(png) / 1e6:.2f} MB, page height {state['height']} px)")
