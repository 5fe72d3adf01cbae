"""With API keys on, a request's key and its rate limit are checked before its body is read. FastAPI read and parsed
a JSON body before it ran any dependency: 22.9 MiB of `[],` sent with no key, or a wrong one, held the event loop
2.4 s and took the API from 72 to 671 MiB before its 401, and a key past its rate limit was refused only after its
body came (the probe of the thirty-eighth session)."""

import http.client
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

from api.auth import key_digest
from conftest import run_stack
from shared.redis_server import RedisServer

KEY = "body-first-key"
# The routes whose JSON body FastAPI reads itself (the others read theirs in the endpoint, after the key).
BODY_ROUTES = ("/v1/jobs", "/v1/jobs/bulk", "/v1/chat/completions", "/v1/feedback")


@pytest.fixture(scope="module")
def keyed():
    """An API with one key, held to 3 requests a minute; no worker."""
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}"]', "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "3"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-body-first-") as stack:
        yield stack


def answer_to_head(stack, path: str, key: str | None = None) -> tuple[int, bytes] | None:
    """The status and body the API answers, within 5 s, to a POST's head that announces a 16 MiB JSON body, none of
    it sent; None for no answer (it waits for the body)."""
    url = urlsplit(stack.base_url)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {16 << 20}\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(head.encode())
        answer = http.client.HTTPResponse(sock)
        try:
            answer.begin()
            return answer.status, answer.read()
        except TimeoutError:
            return None


def peak_memory_mib(pid: int) -> int:
    """The most resident memory process `pid` has held (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) >> 10 for line in status if line.startswith("VmHWM:"))


def test_a_request_without_a_valid_key_is_refused_before_its_body(keyed):
    for path in BODY_ROUTES:
        answer = answer_to_head(keyed, path)
        assert answer is not None and answer[0] == 401 and b"a valid API key is required" in answer[1], (path, answer)
    assert answer_to_head(keyed, "/v1/jobs", key="not-the-key")[0] == 401

    # Sent whole, its body is not parsed: 16 MiB of `[],` took the API's memory up by some 400 MiB.
    body = b'{"prompt": "hi", "pad": [' + b",".join([b"[]"] * ((16 << 20) // 3)) + b"]}"
    before = peak_memory_mib(keyed.processes["api"].pid)
    started = time.monotonic()
    refused = requests.post(f"{keyed.base_url}/v1/jobs", data=body, headers={"Content-Type": "application/json"},
                            timeout=60)
    took, after = time.monotonic() - started, peak_memory_mib(keyed.processes["api"].pid)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert took < 1.0 and after - before < 64, (took, before, after)


def test_a_key_past_its_rate_limit_is_refused_before_its_body(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}

    def poll() -> int:
        return requests.get(f"{keyed.base_url}/v1/jobs", headers=headers, timeout=10).status_code

    # A request with a body counts once, as any other (its key is checked before the body, and again, found checked,
    # by the endpoint): 2 more of the minute's 3 are served.
    assert requests.post(f"{keyed.base_url}/v1/jobs", json={"prompt": "hi"}, headers=headers,
                         timeout=10).status_code == 202
    assert (poll(), poll()) == (200, 200)
    assert any(poll() == 429 for _ in range(4))  # (more than one if a new minute began meanwhile)
    answer = answer_to_head(keyed, "/v1/chat/completions", key=KEY)
    assert answer is not None and answer[0] == 429 and b"rate limit of 3 requests per minute" in answer[1], answer
