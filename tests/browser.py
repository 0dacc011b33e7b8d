"""A real headless Chromium driven over the DevTools protocol (test-only): open a page, read its DOM after
its scripts ran, take a screenshot. `.ci/run` installs Debian's `chromium` when it is missing."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    """One headless Chromium process (its own profile folder) with one page open at `url`."""

    def __init__(self, url: str, width: int = 1280, height: int = 1000) -> None:
        from websockets.sync.client import connect

        exe = chromium()
        if exe is None:
            raise RuntimeError("no chromium: install Debian's `chromium` (.ci/run does)")
        self.profile = tempfile.mkdtemp(prefix="meshpipe-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        port = self._devtools_port()
        deadline = time.monotonic() + 30
        while True:
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
            page = next((p for p in pages if p.get("type") == "page"), None)
            if page or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if page is None:
            raise RuntimeError("chromium opened no page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=64 << 20)
        self.ids = itertools.count(1)

    def _devtools_port(self) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
            if time.monotonic() > deadline:
                break
        raise RuntimeError("chromium did not start its DevTools endpoint")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value in the page (JSON-able)."""
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page never showed {what} within {timeout} s")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # chromium and its helpers: ours, its own group
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)
