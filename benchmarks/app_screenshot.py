"""The web app in a real browser: start `sparseflex app`, open it in headless Chromium, upload a mesh, run Convert,
wait for the result and save a screenshot of the page (the 3D viewers with the input and the result, the metrics,
the normal renders) to docs/app.png.

    python benchmarks/app_screenshot.py [--mesh examples/demo.obj] [-o docs/app.png]

The page's defaults are used (resolution 128).

Needs the app's extra (pip install sparseflex[app]) and Chromium (Debian: apt-get install chromium). Chromium is
driven through the DevTools protocol over a pipe (--remote-debugging-pipe), so nothing else is needed: no driver, no
websocket library. Prints the seconds each phase took.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                  "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--remote-debugging-pipe"]


class DevTools:
    """A minimal Chrome DevTools Protocol client over the pipe Chromium opens with --remote-debugging-pipe (it reads
    commands from its fd 3 and writes replies and events to its fd 4, each message JSON ended by a NUL byte)."""

    def __init__(self, chromium: str, flags: list[str]):
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()
        # move the browser's ends out of the way first, so that placing them at 3 and 4 cannot clobber one another
        r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 10)
        w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def place_pipes():
            os.dup2(r, 3)  # dup2 leaves the copies inheritable; every other descriptor closes on exec
            os.dup2(w, 4)

        self.proc = subprocess.Popen([chromium, *flags, "about:blank"], close_fds=False, preexec_fn=place_pipes,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(r)
        os.close(w)
        self._buffer = b""
        self._next = 0
        self.console: list[str] = []  # the page's console errors and uncaught exceptions

    def _read_message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            self._note(reply)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _note(self, event: dict) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.console.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            frames = params.get("stackTrace", {}).get("callFrames", [])[:4]
            where = " <- ".join(f"{f.get('functionName') or '?'}@{f.get('url', '').rsplit('/', 1)[-1]}:{f.get('lineNumber')}"
                                for f in frames)
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
                                + (f" ({where})" if where else ""))
        elif event.get("method") == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            self.console.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._in)
        os.close(self._out)


class Page:
    def __init__(self, tools: DevTools, url: str, width: int, height: int):
        self.tools = tools
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Log.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})
        self.send("Page.navigate", {"url": url})

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.tools.send(method, params, self.session)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, fail: str | None = None):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            if fail is not None:
                problem = self.evaluate(fail)
                if problem:
                    raise RuntimeError(f"while waiting for {what}: {problem}")
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")

    def upload(self, selector: str, path: str) -> None:
        root = self.send("DOM.getDocument", {"depth": 1})["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise RuntimeError(f"no element {selector!r} on the page")
        self.send("DOM.setFileInputFiles", {"files": [path], "nodeId": node})

    def screenshot(self, path: Path) -> None:
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        width = int(self.evaluate("Math.ceil(document.documentElement.scrollWidth)"))
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                             "scale": 1}})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer within {timeout} s:\n{log.read_text()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default=str(ROOT / "examples" / "demo.obj"), help="mesh to upload")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "app.png"), help="screenshot (PNG)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser")
                        or "chromium", help="Chromium executable (default: chromium on the PATH)")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the convert job")
    args = parser.parse_args()
    mesh = Path(args.mesh).resolve()
    if not mesh.is_file():
        sys.exit(f"error: {mesh}: no such mesh")
    if not shutil.which(args.chromium):
        sys.exit(f"error: {args.chromium}: not found; install Chromium (Debian: apt-get install chromium)")

    work = Path(tempfile.mkdtemp(prefix="sparseflex-screenshot-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = work / "app.log"
    times = {}
    start = time.perf_counter()
    with open(log, "wb") as out:
        app = subprocess.Popen([sys.executable, "-m", "sparseflex", "app", "--port", str(port)], stdout=out,
                               stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(work)}, cwd=ROOT)
    tools = None
    try:
        wait_for_server(url, app, log)
        times["app start"] = time.perf_counter() - start
        t0 = time.perf_counter()
        tools = DevTools(args.chromium, CHROMIUM_FLAGS + [f"--user-data-dir={work / 'profile'}"])
        page = Page(tools, url, args.width, args.height)
        page.wait_for("document.querySelectorAll('input[type=file]').length > 0", 120, "the page to load")
        times["page load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        page.upload("input[type=file]", str(mesh))
        page.wait_for(f"document.body.innerText.includes({json.dumps(mesh.name)})", 120, "the upload")
        page.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Convert').click()")
        errors = "[...document.querySelectorAll('.toast-body, .error')].map(e => e.innerText).join(' ').trim()"
        page.wait_for("document.body.innerText.includes('convert at')", args.timeout, "the convert job", fail=errors)
        times["upload + convert"] = time.perf_counter() - t0
        time.sleep(8)  # the viewers load their GLB files and draw (software WebGL)
        webgl = page.evaluate("(() => { const c = document.createElement('canvas'); "
                              "return !!(c.getContext('webgl2') || c.getContext('webgl')); })()")
        viewers = page.evaluate("document.querySelectorAll('canvas').length")
        out_path = Path(args.output)
        page.screenshot(out_path)
        summary = page.evaluate("[...document.querySelectorAll('.prose, .md')].map(e => e.innerText)"
                                ".find(t => t.includes('convert at'))")
        times["total"] = time.perf_counter() - start
        print(json.dumps({"screenshot": str(out_path), "mesh": str(mesh), 
                          "webgl": webgl, "canvases": viewers, "summary": summary,
                          "console": [line[:300] for line in tools.console],
                          "seconds": {k: round(v, 1) for k, v in times.items()}}, indent=2))
    finally:
        if tools is not None:
            tools.close()
        app.terminate()
        try:
            app.wait(60)
        except subprocess.TimeoutExpired:
            app.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
