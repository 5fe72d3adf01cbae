"""Web pages of other sites, opened in the user's browser, may not use the API (a probe of the twenty-ninth session).
Without API keys a page anywhere could open WS /v1/ws and run jobs (WebSockets have no CORS), or send a "simple"
POST that needs no preflight: a text/plain body to /worker_generate_stream ran a job, a multipart upload to
/v1/batches started a batch. A request with a foreign `Origin` that may change something is refused now; the API's
own page, the origins of CORS_ORIGINS and clients that send no Origin are not."""

import asyncio
import base64
import json
import os
import socket

import pytest
import requests
import websockets

from conftest import run_stack
from shared.redis_server import RedisServer

FOREIGN = "https://evil.example"
APP = "https://app.example"  # the stack of `app_origin_api` lists it in CORS_ORIGINS
REFUSED = (f"requests from web pages of '{FOREIGN}' are refused: that origin is not this API's own; "
           "list it in LLAVA_QUEUE_CORS_ORIGINS to let its pages use the API")


@pytest.fixture(scope="module")
def app_origin_api():
    """An API whose CORS_ORIGINS lists APP; no worker, so that every job it takes stays queued, counted."""
    env = {"LLAVA_QUEUE_CORS_ORIGINS": f'["{APP}"]'}
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-origin-") as stack:
        yield stack


def queued(stack) -> int:
    return sum(requests.get(f"{stack.base_url}/healthz", timeout=10).json()["queued"].values())


def assert_refused(response: requests.Response, origin: str = FOREIGN) -> None:
    assert response.status_code == 403, response.headers  # (not its text: an accepted stream would not end)
    assert response.json() == {"error": {"message": REFUSED.replace(FOREIGN, origin), "type": "permission_denied",
                                         "param": "header.origin", "code": 4}}


async def handshake(url: str, origin: str | None) -> websockets.InvalidStatus:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, origin=origin, open_timeout=10):
            pass
    return refused.value


async def opens(url: str, origin: str | None) -> None:
    async with websockets.connect(url, origin=origin, open_timeout=10):
        pass


async def run_job(url: str, origin: str | None) -> dict:
    """A job submitted on WS /v1/ws from a page of `origin` (None: no page); its last message."""
    async with websockets.connect(f"{url}/v1/ws", origin=origin, open_timeout=10) as socket:
        await socket.send(json.dumps({"prompt": "Say hi", "max_new_tokens": 2}))
        async for message in socket:
            last = json.loads(message)
    return last


async def follow_job(url: str, job_id: str, origin: str | None) -> dict:
    async with websockets.connect(f"{url}/v1/jobs/{job_id}/ws", origin=origin, open_timeout=10) as socket:
        async for message in socket:
            last = json.loads(message)
    return last


@pytest.mark.parametrize("path", ["/v1/ws", "/v1/jobs/some-job/ws"])
def test_a_websocket_from_another_sites_page_is_refused(stack, path):
    for origin in (FOREIGN, "null"):  # null: a sandboxed frame, a page opened from a file
        refused = asyncio.run(handshake(f"{stack.ws_url}{path}", origin))
        assert refused.response.status_code == 403
        assert json.loads(refused.response.body)["error"]["message"] == REFUSED.replace(FOREIGN, origin)


def test_a_websocket_from_the_apis_own_page_or_from_no_page_is_served(stack):
    # The page at / opens its sockets at its own origin; `websocket-client` sends the URL's as well; `websockets`
    # and the bench send none.
    own = asyncio.run(run_job(stack.ws_url, stack.base_url))
    assert own["status"] == "succeeded", own
    assert asyncio.run(run_job(stack.ws_url, None))["status"] == "succeeded"
    assert asyncio.run(follow_job(stack.ws_url, own["id"], stack.base_url))["status"] == "succeeded"


def test_the_apis_own_page_submits_and_other_pages_read_only(stack):
    own = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Say hi", "max_new_tokens": 2},
                        headers={"Origin": stack.base_url}, timeout=10)
    assert own.status_code == 202, own.text
    # What only reads is answered (CORS keeps the answer from the page), and says which headers a page may read.
    read = requests.get(f"{stack.base_url}/v1/jobs/{own.json()['id']}", headers={"Origin": FOREIGN}, timeout=10)
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    assert_refused(requests.delete(f"{stack.base_url}/v1/jobs/{own.json()['id']}", headers={"Origin": FOREIGN},
                                   timeout=10))


def test_a_simple_post_from_another_sites_page_is_refused_and_runs_nothing(app_origin_api):
    stack = app_origin_api
    before = queued(stack)
    # A text/plain body needs no preflight, and /worker_generate_stream reads any Content-Type (the original did).
    for origin in (FOREIGN, "null"):
        with requests.post(f"{stack.base_url}/worker_generate_stream", data='{"prompt": "hi", "max_new_tokens": 3}',
                           headers={"Origin": origin, "Content-Type": "text/plain"}, stream=True,
                           timeout=10) as sent:
            assert_refused(sent, origin)
    batch_line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
    batch = requests.post(f"{stack.base_url}/v1/batches", files={"file": ("b.jsonl", json.dumps(batch_line))},
                          headers={"Origin": FOREIGN}, timeout=10)
    assert_refused(batch)
    assert requests.get(f"{stack.base_url}/v1/batches", timeout=10).json()["data"] == []
    assert queued(stack) == before


def test_a_page_of_a_configured_origin_uses_the_api_and_reads_its_headers(app_origin_api):
    stack = app_origin_api
    preflight = requests.options(f"{stack.base_url}/v1/jobs", timeout=10, headers={
        "Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200 and preflight.headers["Access-Control-Allow-Origin"] == APP
    before = queued(stack)
    created = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "hi", "max_new_tokens": 3},
                            headers={"Origin": APP}, timeout=10)
    assert created.status_code == 202, created.text
    assert created.headers["Access-Control-Allow-Origin"] == APP
    exposed = {name.strip().lower() for name in created.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"retry-after", "x-job-id", "x-should-retry"} <= exposed
    assert queued(stack) == before + 1
    # Its sockets too (the job waits in the queue: the socket opens, and is left).
    asyncio.run(opens(f"{stack.ws_url}/v1/jobs/{created.json()['id']}/ws", APP))


def test_a_refused_preflight_answers_the_json_error(stack, app_origin_api):
    for api in (stack, app_origin_api):  # none configured, and another one
        preflight = requests.options(f"{api.base_url}/v1/chat/completions", timeout=10, headers={
            "Origin": FOREIGN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert_refused(preflight)
        assert "access-control-allow-origin" not in preflight.headers


def raw_handshake(base_url: str, path: str, host_header: str) -> bytes:
    """The status line and headers a WebSocket handshake to `path` sent with `host_header` as its Host gets."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
    return head


def test_a_page_that_points_its_name_at_this_machine_is_refused(stack, app_origin_api):
    """DNS rebinding: a page of evil.example, once loaded, points evil.example at 127.0.0.1; its requests then go to
    the API as to the page's own origin (same origin: no Origin check, no CORS, the answers readable; a GET of
    /v1/batches or /v1/files lists what others sent). The browser still writes the page's name in Host: a
    connection over loopback is served under localhost, an IP address, this machine's name, and the names of
    PUBLIC_URL and CORS_ORIGINS only."""
    port = stack.base_url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for method, path in (("GET", "/v1/batches"), ("GET", "/v1/files"), ("POST", "/v1/jobs")):
        answer = requests.request(method, f"{stack.base_url}{path}", headers=rebound, json={"prompt": "hi"},
                                  timeout=10)
        assert answer.status_code == 403 and answer.json()["error"]["param"] == "header.host", (path, answer.text)
        assert "under the name 'evil.example'" in answer.json()["error"]["message"], answer.text
    assert raw_handshake(stack.base_url, "/v1/ws", f"evil.example:{port}").startswith(b"HTTP/1.1 403"), "handshake"
    # The names a browser on this machine reaches it by.
    for name in ("localhost", "chat.localhost", "127.0.0.1", "[::1]", socket.gethostname()):
        answer = requests.get(f"{stack.base_url}/v1/batches", headers={"Host": f"{name}:{port}"}, timeout=10)
        assert answer.status_code == 200, (name, answer.text)
    assert raw_handshake(stack.base_url, "/v1/ws", f"localhost:{port}").startswith(b"HTTP/1.1 101"), "localhost"
    # A name CORS_ORIGINS lists (a proxy on this machine that passes Host on) is served.
    app_port = app_origin_api.base_url.rsplit(":", 1)[1]
    answer = requests.get(f"{app_origin_api.base_url}/v1/batches", headers={"Host": f"app.example:{app_port}"},
                          timeout=10)
    assert answer.status_code == 200, answer.text
