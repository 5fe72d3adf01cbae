"""Bounds on what one client may hold or try (a body that drips in, wrong API keys), reads that do not use up a key's
rate limit, and a group commit that fails part-way leaving its Idempotency-Keys free; on a real API process and a real
Redis."""

import http.client
import json
import socket
import threading
import time

import redis
import requests
from starlette.requests import HTTPConnection

from api.auth import client_address, key_digest
from api.main import REQUEST_BODY_MIN_RATE
from conftest import run_stack
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_limits import KEY, api_only, wait_for_a_fresh_minute  # noqa: F401 (fixture)
from test_submission import make_submitter, queued_messages, redis_url  # noqa: F401 (fixture)

BODY_TIMEOUT = 1.0


def test_a_body_that_drips_in_is_answered_408_once_past_its_deadline():
    # A byte sent just before each idle limit (20 s) held the connection, and its handler, for ever. Now a body has
    # REQUEST_BODY_TIMEOUT_SECONDS, and a second more for every REQUEST_BODY_MIN_RATE bytes that came.
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_REQUEST_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)},
                                            workers=(), log_prefix="llava-queue-drip-") as stack:
        host, port = stack.base_url.removeprefix("http://").split(":")

        def head(length: int) -> bytes:
            return (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {length}\r\n\r\n").encode()

        # A body that comes at twice the least rate is taken, though it takes longer than the timeout alone.
        body = json.dumps({"prompt": "x" * 1500}).encode()
        pieces = [body[at:at + 100] for at in range(0, len(body), 100)]
        pause = 100 / (2 * REQUEST_BODY_MIN_RATE)
        assert pause * len(pieces) > BODY_TIMEOUT
        with socket.create_connection((host, int(port))) as steady:
            steady.sendall(head(len(body)))
            for piece in pieces:
                time.sleep(pause)
                steady.sendall(piece)
            steady.settimeout(10)
            assert steady.recv(65536).startswith(b"HTTP/1.1 202")

        # In the route's own format: the JSON error, or one frame where the original clients read frames.
        for path in ("/v1/jobs", "/worker_generate_stream"):
            answer, took = drip(host, int(port), head(1000).replace(b"/v1/jobs", path.encode()))
            assert answer.startswith(b"HTTP/1.1 408"), answer[:300] or f"no answer in {took:.1f} s"
            assert BODY_TIMEOUT <= took < BODY_TIMEOUT + 5, took
            headers, _, payload = answer.partition(b"\r\n\r\n")
            assert b"connection: close" in headers.lower()
            error = json.loads(payload.rstrip(b"\0"))
            message = error["text"] if path == "/worker_generate_stream" else error["error"]["message"]
            assert "the request body came too slowly" in message and "REQUEST_BODY_TIMEOUT_SECONDS" in message, error


def drip(host: str, port: int, head: bytes) -> tuple[bytes, float]:
    """Send `head` and a body's first bytes, then a byte every 0.2 s (well within the idle limit) until the API
    answers and closes the connection, or 10 s pass; what it answered, and how long that took."""
    with socket.create_connection((host, port)) as sock:
        sock.sendall(head + b'{"prompt": "')
        sock.settimeout(0.2)
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b"x")
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not data:
                break
            answer += data
        return answer, time.monotonic() - started


LIMIT = Settings().auth_failures_per_minute  # the default: the stack sets no other


def get(stack, path: str, key: str | None) -> requests.Response:
    return requests.get(f"{stack.base_url}{path}", headers={"Authorization": f"Bearer {key}"} if key else {},
                        timeout=10)


def test_wrong_api_keys_from_one_address_are_refused_past_a_limit(api_only):  # noqa: F811
    # A client could try keys without end, each answered 401. Past LIMIT wrong keys in a minute,
    # its address is answered 429 with Retry-After, as past a key's rate limit, until the minute ends.
    wait_for_a_fresh_minute()
    # Requests without a key (a page before its key is entered) try none: not counted.
    assert {get(api_only, "/v1/models", None).status_code for _ in range(LIMIT + 5)} == {401}
    statuses = [get(api_only, "/v1/models", f"guess-{index}").status_code
                for index in range(LIMIT)]
    assert statuses == [401] * LIMIT
    refused = get(api_only, "/v1/jobs/x", "guess-next")
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60, refused.text
    error = refused.json()["error"]
    assert error["type"] == "rate_limited" and "wrong API key" in error["message"], error
    # The right key from that address is refused too: its key is not checked (a 401 or not would tell it).
    assert get(api_only, "/v1/models", KEY).status_code == 429
    # Another address is not refused.
    host, port = api_only.base_url.removeprefix("http://").split(":")
    other = http.client.HTTPConnection(host, int(port), timeout=10, source_address=("127.0.0.2", 0))
    for key, status in ((KEY, 200), ("guess-again", 401)):
        other.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        answer = other.getresponse()
        answer.read()
        assert answer.status == status
    other.close()
    log = (api_only.log_dir / "api.log").read_text()
    assert f"sent a wrong API key {LIMIT} times this minute" in log


def test_wrong_keys_are_not_counted_with_their_limit_off():
    # Behind a proxy that the API does not trust to name its clients, they all share its address, and one client's
    # wrong keys lock the others out: AUTH_FAILURES_PER_MINUTE=0 turns the limit off.
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}"]', "LLAVA_QUEUE_AUTH_FAILURES_PER_MINUTE": "0"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-keys-off-") as stack:
        assert {get(stack, "/v1/models", f"guess-{index}").status_code for index in range(LIMIT + 5)} == {401}
        assert get(stack, "/v1/models", KEY).status_code == 200
        assert not redis.Redis.from_url(server.url).keys("*key-failures*")


def test_wrong_keys_are_counted_by_ipv4_address_and_ipv6_64():
    # Each address of an IPv6 /64 (which one host is given) had its own tries, as many as the /64 has addresses.
    def address(host: str) -> str:
        return client_address(HTTPConnection({"type": "http", "client": (host, 1234)}))

    assert address("2001:db8:1:2:aaaa::1") == address("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address("2001:db8:1:3::1") != address("2001:db8:1:2::1")
    assert address("::ffff:192.0.2.7") == address("192.0.2.7") == "192.0.2.7"
    assert address("192.0.2.8") != address("192.0.2.7")
    assert address("testclient") == "testclient"


def test_reading_the_model_list_does_not_use_up_the_keys_rate_limit(api_only):  # noqa: F811
    # The chat page reads GET /v1/models every 30 s (every 5 s while an answer waits): counted with the key's other
    # requests, a page left open used them up (here 40 a minute). Its reads have a budget of their own.
    wait_for_a_fresh_minute()
    reads = [get(api_only, "/v1/models", KEY).status_code for _ in range(39)]
    assert reads + [get(api_only, "/v1/models/none", KEY).status_code] == [200] * 39 + [404]
    assert get(api_only, "/v1/models", None).status_code == 401  # the key is still checked
    statuses = [get(api_only, "/v1/jobs/none", KEY).status_code for _ in range(41)]
    assert statuses == [404] * 40 + [429]
    over = get(api_only, "/v1/models", KEY)
    assert over.status_code == 429 and "counted apart" in over.json()["error"]["message"], over.text


def submit_in_order(submitter, store, calls: list[tuple[str | None, str]]) -> list:
    """Submit each (idempotency key, prompt) on a thread of its own: the first commits alone, held
    (`test_submission.HeldStore`) until the others wait, in order, to be committed as one group; each call's ids or
    error, in order."""
    answers: list = [None] * len(calls)

    def run(index: int) -> None:
        key, prompt = calls[index]
        try:
            answers[index] = submitter.submit([(GenerateRequest(prompt=prompt), "interactive")], idempotency_key=key)
        except redis.RedisError as exc:  # the API answers it 503
            answers[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    threads[0].start()
    assert store.entered.wait(30)
    for index, thread in enumerate(threads[1:], 1):
        thread.start()
        deadline = time.monotonic() + 30
        while len(submitter._waiting) < index:
            assert time.monotonic() < deadline, "the call never queued up behind the held commit"
            time.sleep(0.01)
    store.release.set()
    for thread in threads:
        thread.join(30)
    return answers


def test_a_redis_error_part_way_through_a_group_leaves_the_keys_before_it_free(redis_url):  # noqa: F811
    # A Redis error on one submission of a group (its key of another type) failed the group, and left the body of
    # each keyed submission checked before it recorded under its key, though nothing was created: the client's retry
    # under that key, its body corrected, was a 422 ("already used with a different request").
    submitter, store = make_submitter(redis_url)
    store.redis.rpush(store.idempotency_key("broken"), "not a job id")
    first, keyed, broken = submit_in_order(submitter, store, [(None, "first"), ("k", "a"), ("broken", "b")])
    assert isinstance(keyed, redis.ResponseError) and isinstance(broken, redis.ResponseError), (keyed, broken)
    assert queued_messages(store) == first  # nothing of the failed group was enqueued
    assert not store.redis.exists(store.idempotency_body_key("k"))

    [job_id] = submitter.submit([(GenerateRequest(prompt="a, corrected"), "interactive")], idempotency_key="k")
    assert store.get(job_id)["prompt"] == "a, corrected" and queued_messages(store) == first + [job_id]
