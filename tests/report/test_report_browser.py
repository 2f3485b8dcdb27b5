"""The HTML report in a real headless Chromium: offline, no console errors, JS works, inert data.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``); this file installs nothing. Without
the binary the tests are skipped, except under CI (``CI`` set), where a missing browser fails.

Two ways of driving the browser, both stdlib only:

* the command line (``--dump-dom``, ``--screenshot``) for the DOM after the scripts ran and a
  screenshot, with ``--enable-logging=stderr`` to catch console messages;
* the DevTools protocol over ``--remote-debugging-pipe`` (JSON messages on fds 3 and 4), to list
  every request the page makes, collect exceptions and console errors, and exercise the eps
  selector, the hover read-out and the sortable table.

Networking is off twice over: a dead proxy for everything but loopback, and the page's own
Content-Security-Policy (``default-src 'none'``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from attn_audit.report import get_renderer
from tests.synthetic import make_result

CHROMIUM = "/usr/bin/chromium"
ACTUAL = Path(__file__).resolve().parents[1] / "actual"
TIMEOUT = 90

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'
MARK_SCRIPT = "<script>document.documentElement.setAttribute('data-pwned','script')</script>"
MARK_ATTR = "\"><img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">"
MARK_JSON = "</script><script>document.documentElement.setAttribute('data-pwned','json')</script>"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary; skipped when missing locally, a failure under CI."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI; install it: apt-get install -y chromium")
        pytest.skip(
            f"{CHROMIUM} not found (apt-get install -y chromium); set CI=1 to make this fail"
        )
    return path


def _flags(chromium: str, profile: Path) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9",  # every non-loopback request goes to a closed port
        "--proxy-bypass-list=<-loopback>",
    ]


def _full_result(**kwargs: Any) -> Any:
    return make_result(
        num_layers=12,
        num_heads=6,
        num_kv_heads=2,
        qq=True,
        theory=True,
        seq_lens=(128, 256, 512),
        plan=True,
        verify=True,
        gate="fail",
        **kwargs,
    )


def _write_page(tmp_path: Path, result: Any) -> Path:
    page = tmp_path / "report.html"
    page.write_text(get_renderer("html").render(result), encoding="utf-8")
    return page


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _console_lines(stderr: str) -> list[str]:
    """Console messages Chromium logged (our page logs nothing, so every one is a problem)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_dom_after_scripts_and_no_console_errors(chromium: str, tmp_path: Path) -> None:
    page = _write_page(tmp_path, _full_result())
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    proc = _run(
        [*_flags(chromium, tmp_path / "profile"), "--enable-logging=stderr", "--v=0"]
        + ["--dump-dom", page.as_uri()]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert re.search(r'<html[^>]*data-ready="1"', dom), "the page's script did not run"
    for table in ("plan-table", "ranking-table", "gate-table", "verify-table"):
        assert re.search(rf'<table[^>]*id="{table}"[^>]*data-ready="1"', dom) or re.search(
            rf'<table[^>]*data-ready="1"[^>]*id="{table}"', dom
        ), table
    assert re.search(r'<html[^>]*class="js"', dom)
    assert _console_lines(proc.stderr) == []


def test_screenshot(chromium: str, tmp_path: Path) -> None:
    page = _write_page(tmp_path, _full_result())
    shot = tmp_path / "report.png"
    proc = _run(
        [*_flags(chromium, tmp_path / "profile"), f"--screenshot={shot}", "--window-size=1280,2000"]
        + [page.as_uri()]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2000)
    assert len(data) > 50_000, "a blank page compresses to a few kB; this one has figures"
    ACTUAL.mkdir(exist_ok=True)
    shutil.copyfile(shot, ACTUAL / "report-screenshot.png")  # for a human look (git-ignored)


def test_model_and_data_strings_stay_text(chromium: str, tmp_path: Path) -> None:
    result = make_result(
        name=XSS_SCRIPT + MARK_SCRIPT + XSS_ATTR + MARK_ATTR,
        dataset_spec=MARK_ATTR + XSS_ATTR + MARK_SCRIPT,
        plan=True,
        gate="fail",
    )
    result.data["ranking"][0]["reason"] = MARK_SCRIPT
    result.data["plan"][0]["reason"] = MARK_ATTR
    result.data["heads"][0]["flags"] = [MARK_ATTR]
    result.data["heads"][0]["gaussianity"]["q"]["verdict"] = MARK_JSON
    result.data["gate"]["checks"][0]["message"] = MARK_SCRIPT
    page = _write_page(tmp_path, result)
    proc = _run(
        [*_flags(chromium, tmp_path / "profile"), "--enable-logging=stderr", "--v=0"]
        + ["--dump-dom", page.as_uri()]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert 'data-pwned="' not in dom, "an injected script or handler ran"
    assert len(re.findall(r"<script\b", dom)) == 2, "an element was injected"
    assert not re.search(r"<img\b", dom), "an element was injected"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom
    assert re.search(r'<html[^>]*data-ready="1"', dom)
    assert _console_lines(proc.stderr) == []


# -- DevTools protocol over a pipe --------------------------------------------------------------


class DevTools:
    """A minimal client of Chromium's DevTools protocol over --remote-debugging-pipe."""

    def __init__(self, argv: list[str]) -> None:
        cmd_r, cmd_w = os.pipe()
        resp_r, resp_w = os.pipe()
        # Park the child's ends above fd 10 so that dup2 onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
        os.close(cmd_r)
        os.close(resp_w)

        def in_child() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [*argv, "--remote-debugging-pipe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=in_child,
        )
        os.close(child_r)
        os.close(child_w)
        self.write_fd, self.read_fd = cmd_w, resp_r
        self.buffer = b""
        self.last_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        result: dict[str, Any] = json.loads(message)
        return result

    def call(self, method: str, params: dict[str, Any] | None = None, page: bool = True) -> Any:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if page and self.session:
            message["sessionId"] = self.session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self.last_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait(self, method: str) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + TIMEOUT
        while True:
            event = self._message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, page=False
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", {"url": url})
        self.wait("Page.loadEventFired")

    def js(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in answer:
            raise AssertionError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", page=False)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.write_fd)
        os.close(self.read_fd)


HOVER = """(() => {
  const fig = document.querySelector('figure[data-heat="R"]');
  const svg = fig.querySelector('svg');
  const info = JSON.parse(document.getElementById('heat-data').textContent)['R'];
  svg.scrollIntoView();
  const r = svg.getBoundingClientRect(), b = info.box;
  // centre of the cell of head 2 (row) in layer 3 (column)
  const x = r.left + r.width * (b[0] + (b[2] - b[0]) * (3.5 / info.cols));
  const y = r.top + r.height * (b[1] + (b[3] - b[1]) * (2.5 / info.rows));
  svg.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: y, bubbles: true}));
  const tip = fig.querySelector('.tip');
  return [tip.hidden, tip.textContent];
})()"""

SORT = """(() => {
  const table = document.getElementById('ranking-table');
  const first = () => table.tBodies[0].rows[0].cells[0].textContent;
  const before = first();
  const th = table.querySelectorAll('thead th')[0];
  th.click();
  const asc = [th.getAttribute('aria-sort'), first()];
  th.click();
  return [before, asc, th.getAttribute('aria-sort'), first(), table.tBodies[0].rows.length];
})()"""

EPS = """(() => {
  const visible = () => Array.from(document.querySelectorAll('.eps-panel'))
      .filter(p => !p.hidden).map(p => p.dataset.eps);
  const before = visible();
  const radio = document.querySelector('.eps-select input[value="0.01"]');
  radio.click();
  return [before, visible(), getComputedStyle(document.querySelector('.eps-select')).display];
})()"""


def test_devtools_offline_no_errors_and_interactions(chromium: str, tmp_path: Path) -> None:
    page = _write_page(tmp_path, _full_result())
    tools = DevTools([*_flags(chromium, tmp_path / "profile"), "--window-size=1280,1000"])
    try:
        tools.open(page.as_uri())
        assert tools.js("document.documentElement.dataset.ready") == "1"
        hidden, text = tools.js(HOVER)
        assert not hidden and text.startswith("L3.H2: logit range"), text
        before, (asc_state, asc_first), desc_state, desc_first, rows = tools.js(SORT)
        assert (before, asc_state, asc_first) == ("1", "ascending", "1")
        assert (desc_state, desc_first, rows) == ("descending", str(rows), 72)
        assert tools.js(EPS) == [["0.05"], ["0.01"], "block"]
        shot = tools.call("Page.captureScreenshot", {"format": "png"})
        assert len(base64.b64decode(shot["data"])) > 10_000
    finally:
        tools.close()
    requests = [
        e["params"]["request"]["url"]
        for e in tools.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests and requests[0] == page.as_uri()
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    errors = [
        e
        for e in tools.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        or e.get("method") == "Network.loadingFailed"
    ]
    assert errors == []
