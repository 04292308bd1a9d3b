"""Headless Chromium driven over the DevTools protocol with the standard library only (a minimal WebSocket client).

Used by the viewer's browser test and ``scripts/viewer_screenshot.py``: open a page at an
exact viewport size, wait in real time until an expression on the page holds (what the page
says it drew), read values from the page, and capture the viewport as PNG bytes. Chromium's
``--screenshot`` flag cannot do this: its window size includes browser chrome the page never
sees, and the capture resizes the page after its scripts have stopped.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1200, height: int = 800, timeout: float = 60.0) -> None:
        browser = find_chromium()
        if browser is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.mkdtemp(prefix="gigaseg-chromium-")
        flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio",
                 "--remote-debugging-port=0", f"--user-data-dir={self._profile}", f"--window-size={width},{height}"]
        if os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._process = subprocess.Popen([browser, *flags, "about:blank"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        self._socket: socket.socket | None = None
        self._next_id = 0
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ connection

    def _connect(self) -> None:
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (marker.is_file() and marker.read_text().count("\n") >= 1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.05)
        port = int(marker.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
            pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
        path = "/" + pages[0]["webSocketDebuggerUrl"].split("/", 3)[3]
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=self.timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._socket.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._socket.recv(4096)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools connection")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self._socket.recv(n - len(data))
            if not chunk:
                raise RuntimeError("chromium closed the DevTools connection")
            data += chunk
        return data

    def _send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # one final text frame
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 2**16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)  # a client masks every frame
        self._socket.sendall(bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive(self) -> dict[str, Any]:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise RuntimeError("chromium closed the DevTools connection")
            if opcode in (0x9, 0xA):  # ping, pong: not part of a message
                continue
            message += payload
            if first & 0x80:
                return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a DevTools command and return its result (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        self._send(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        while True:
            message = self._receive()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    # ------------------------------------------------------------------ pages

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until its document has loaded (not the previous page's)."""
        self.call("Page.navigate", {"url": url})
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression on the page (JSON-able)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None) -> Any:
        """Poll ``expression`` until it is truthy; its value, or a ``TimeoutError`` naming it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never made {expression!r} true")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        """The viewport as PNG bytes."""
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
