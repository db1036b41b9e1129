"""A headless Chromium driven over the DevTools protocol: open a page, wait for text, click a tab, screenshot.

Uses Debian's `chromium` and the `websockets` client that Prefect already depends on, so no
browser download or driver is needed. Always used as a context manager: the browser's
process group is killed on exit.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    def __init__(self, port: int, width: int = 1600, height: int = 1800):
        self.port, self.size = port, (width, height)
        self.profile = tempfile.mkdtemp(prefix="ptflow-chromium-")
        self.ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.3)
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=10)
        self.call("Page.enable")
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "socket", None):
            self.socket.close()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=60))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, *needles: str, timeout: float = 60) -> str:
        """Wait until every needle is in the page's text; return the text (or raise with what was seen)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str) -> None:
        """Click the innermost visible element whose own text is exactly `label` (a tab, a button)."""
        found = self.evaluate(f"""(() => {{
            const hits = [...document.querySelectorAll('button, a, [role=tab], li, span, div')]
              .filter(e => e.textContent.trim() === {json.dumps(label)} && e.offsetParent !== null);
            if (!hits.length) return false;
            hits[hits.length - 1].click();
            return true;
        }})()""")
        if not found:
            raise AssertionError(f"no clickable {label!r} on the page:\n{self.text()[:2000]}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
