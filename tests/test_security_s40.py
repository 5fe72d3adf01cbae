"""The API's edges against a web page of another site (a security review of the fortieth session).

A page that points a name of its own at 127.0.0.1 (DNS rebinding) was served by an API listening on `::` (every
address, IPv6 and IPv4), which sees a connection to 127.0.0.1 come from `::ffff:127.0.0.1`: that is not loopback to
Python before 3.13, so the name was not checked. And the chat page, which writes model answers into the DOM as HTML,
had no Content-Security-Policy: markup that got through the renderer ran its inline script, and could read the API
key the page keeps. A real API process and Debian's Chromium, as tests/test_page.py drives it.
"""

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import requests
from conftest import first_answer, start_service, stop_processes

from shared.redis_server import RedisServer, free_port
from test_page import browser, quick_answers

__all__ = ["browser"]  # the fixture, shared with tests/test_page.py

REBOUND = "evil.example"


def listens_on_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def dual_stack_api():
    """An API listening on `::` (no worker: nothing here runs a job); yields its port."""
    if not listens_on_ipv6():
        pytest.skip("this machine has no IPv6 to listen on")
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-security-"))
    port = free_port()
    with RedisServer() as redis_server:
        api = start_service("api", ["api", "--host", "::", "--port", str(port)],
                            dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url), log_dir)
        try:
            first_answer(api, "GET", f"http://127.0.0.1:{port}/healthz",
                         logs=lambda: (log_dir / "api.log").read_text())
            yield port
        finally:
            stop_processes([api])


def test_a_rebound_name_is_refused_by_an_api_listening_on_every_address(dual_stack_api):
    # The page's requests reach the API over 127.0.0.1 under the page's own name: same origin for the browser, so
    # no Origin check and no CORS; `GET /v1/files` answered it with every file uploaded (keys off).
    port = dual_stack_api
    for address in ("127.0.0.1", "[::1]"):
        answer = requests.get(f"http://{address}:{port}/v1/files", headers={"Host": f"{REBOUND}:{port}"}, timeout=10)
        assert answer.status_code == 403, (address, answer.text)
        assert answer.json()["error"]["param"] == "header.host", answer.text
        assert f"under the name {REBOUND!r}" in answer.json()["error"]["message"], answer.text
    # The names a browser on this machine reaches it by are served, over both.
    for address, name in (("127.0.0.1", "localhost"), ("127.0.0.1", "127.0.0.1"), ("[::1]", "[::1]")):
        answer = requests.get(f"http://{address}:{port}/v1/files", headers={"Host": f"{name}:{port}"}, timeout=10)
        assert answer.status_code == 200, (address, name, answer.text)


def test_the_page_and_its_files_allow_only_their_own_scripts_and_no_framing(dual_stack_api):
    base_url = f"http://127.0.0.1:{dual_stack_api}"
    for path in ("/", "/static/app.js", "/static/markdown.js", "/static/style.css"):
        answer = requests.get(f"{base_url}{path}", timeout=10)
        assert answer.status_code == 200, (path, answer.text)
        policy = {directive.split()[0]: directive.split()[1:]
                  for directive in answer.headers.get("content-security-policy", "").split(";") if directive.strip()}
        # Only the page's own files: no inline script, event handler attribute or javascript: URL.
        assert policy.get("script-src", [])[:1] == ["'self'"], (path, answer.headers)
        assert not {"'unsafe-inline'", "*", "data:", "http:"} & set(policy["script-src"]), policy
        assert policy.get("frame-ancestors") == ["'none'"] and policy.get("object-src") == ["'none'"], path
        assert answer.headers.get("x-content-type-options") == "nosniff", (path, answer.headers)


# Markup as a renderer bug would let it into an answer: an event handler attribute, and a javascript: link.
INJECT = """() => new Promise((resolve) => {
  const box = document.querySelector("#conversation > .turn.assistant:last-child .markdown");
  box.innerHTML = '<img id="probe" src="/no-such-image" onerror="window.ran = \\'onerror\\'">' +
                  '<a id="probe-link" href="javascript:window.ran = \\'link\\'">link</a>';
  document.getElementById("probe").addEventListener("error", () => resolve());
})"""


def until(page, condition: str, seconds: float) -> None:
    """Poll the page until `condition` (a JS expression) holds."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"not within {seconds} s: {condition}"
        time.sleep(0.1)


def test_markup_that_gets_into_an_answer_runs_no_script_and_the_page_still_works(browser, stack):
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    refused = []
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text
            else None)
    try:
        page.goto(f"{stack.base_url}/")
        # Under the policy the page's own scripts run: it reads the model list, and streams an answer over its socket.
        # (Waited for by polling: wait_for_function evaluates its string as code, which the policy refuses.)
        until(page, "document.getElementById('model').value !== ''", 30)
        quick_answers(page)
        page.get_by_label("Message").fill("Say hello.")
        page.get_by_label("Message").press("Enter")
        until(page, "['succeeded', 'failed', 'cancelled'].includes(document.querySelector("
                    "'#conversation > .turn.assistant:last-child')?.dataset.status)", 120)
        assert page.evaluate("document.querySelector('#conversation > .turn.assistant:last-child').dataset.status") \
            == "succeeded"
        assert refused == [], refused
        page.evaluate(INJECT)
        assert page.evaluate("window.ran") is None, "the injected event handler ran"
        with page.expect_console_message(lambda message: "Content Security Policy" in message.text):
            page.click("#probe-link")
        assert page.evaluate("window.ran") is None, "the injected javascript: link ran"
    finally:
        page.close()
