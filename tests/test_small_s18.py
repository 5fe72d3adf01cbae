"""Small defects: a stream's last message to a client that reads nothing, the dtype a quantized worker names at
start-up, and the Redis round trips of a job's start."""

import re
import select
import socket
import time
import uuid

import pytest
import redis

from conftest import LET_GO_SLACK_SECONDS, SEND_TIMEOUT_SECONDS, run_stack
from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from test_gateway_s16 import open_raw_websocket
from test_stream_followers import api_log


@pytest.fixture()
def api_alone():
    """An API, no worker, on a Redis of its own (the test stops it, or plays the worker on it)."""
    server = RedisServer().start()
    try:
        with run_stack(server.url, {"LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS)}, workers=(),
                       log_prefix="llava-queue-s18-") as running:
            running.redis_server = server
            yield running
    finally:
        server.stop()


def running_job_with_big_text(stack) -> str:
    """A job recorded as running (this test is its worker) whose text is 1.5 M control characters: its first message
    is 9 MB of JSON (each written as 6 bytes), more than the socket buffers of a connection on this host hold (about
    3 MB), so that every message after it waits for the client to read."""
    store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True))
    job_id, _ = store.create(GenerateRequest(prompt="hi", max_new_tokens=4), "interactive")
    store.redis.hset(store.key(job_id), mapping={"status": "running", "text": "\x01" * 1_500_000, "seq": 1})
    return job_id


def join_and_read_nothing(stack, job_id: str) -> socket.socket:
    """A client that joins the job's stream and reads nothing; returned once the stream's first bytes have reached
    it (the API has read the record and sent its first message)."""
    unread = open_raw_websocket(stack.base_url, f"/v1/jobs/{job_id}/ws")
    readable, _, _ = select.select([unread], [], [], 30)
    assert readable, f"the stream of job {job_id} sent nothing in 30 s\n{api_log(stack)[-3000:]}"
    return unread


def until_let_go(stack, job_id: str, unread: socket.socket) -> None:
    """Wait until the API logs that it let the client of `job_id` go; AssertionError if it has not after the
    follower's resync (5 s), the send timeout and some slack."""
    try:
        deadline = time.monotonic() + 5 + SEND_TIMEOUT_SECONDS + LET_GO_SLACK_SECONDS
        while f"the client of job {job_id} read nothing for" not in api_log(stack):
            assert time.monotonic() < deadline, f"the stream of job {job_id} still waits on its last message"
            time.sleep(0.5)
    finally:
        unread.close()


def test_a_client_that_reads_nothing_is_let_go_when_its_job_is_gone(api_alone):
    """The job's record goes (it expired) while its client reads nothing: the follower's next read of the record
    finds no job, and the stream's last message ("unknown job id") waits behind the unread first one. Before, it
    waited for as long as the client held the connection; now the send timeout, as any other message."""
    job_id = running_job_with_big_text(api_alone)
    unread = join_and_read_nothing(api_alone, job_id)
    store = JobStore(redis.Redis.from_url(api_alone.redis_url))
    store.redis.delete(store.key(job_id))
    until_let_go(api_alone, job_id, unread)


def test_a_client_that_reads_nothing_is_let_go_when_redis_goes_away(api_alone):
    """Redis goes away while the client reads nothing: the stream's last message ("the job store is unavailable")
    waits behind the unread first one. Before, for as long as the client held the connection; now
    the send timeout."""
    job_id = running_job_with_big_text(api_alone)
    unread = join_and_read_nothing(api_alone, job_id)
    api_alone.redis_server.stop()
    until_let_go(api_alone, job_id, unread)
    assert f"the stream of job {job_id} lost Redis" in api_log(api_alone)


@pytest.mark.parametrize(("settings", "precision"), [
    ({"dtype": "auto", "load_8bit": True}, "int8 weights (bitsandbytes), float16 compute"),
    ({"dtype": "auto", "load_4bit": True}, "nf4 4-bit weights (bitsandbytes), float16 compute"),
    ({"dtype": "bfloat16", "load_4bit": True},
     "nf4 4-bit weights (bitsandbytes), float16 compute, other layers bfloat16"),
    ({"dtype": "auto"}, "float16"),
])
def test_describe_precision_names_a_quantized_models_weights_and_compute_dtype(settings, precision):
    """A worker with LLAVA_QUEUE_LOAD_8BIT / LOAD_4BIT on a GPU logged `dtype float16` at start-up, as an unquantized
    one: the dtype its other layers load in. describe_precision, which that line writes, names the int8 / nf4 weights
    and the compute dtype now. (A unit test of the description: 8/4-bit loading needs a CUDA GPU and bitsandbytes;
    test_pipeline checks the line a real worker writes.)"""
    import torch

    from workers.builder import describe_precision, resolve_dtype

    dtype = resolve_dtype(settings["dtype"], torch.device("cuda"))
    assert describe_precision(dtype, settings.get("load_8bit", False), settings.get("load_4bit", False)) == precision


class Recording(redis.Connection):
    """Keeps the first words (command, key) of every request the client sends: a pipeline is one request, one
    round trip, whose first command is kept."""

    sent: list[list[str]] = []

    def send_packed_command(self, command, check_health=True):
        first = command if isinstance(command, (bytes, str)) else command[0]
        first = first.encode() if isinstance(first, str) else first
        Recording.sent.append([word.decode() for word in re.findall(rb"\$\d+\r\n([^\r]*)\r\n", first)[:2]])
        return super().send_packed_command(command, check_health)


def test_a_job_start_reads_its_request_and_queue_in_one_round_trip(redis_server, default_model_dir):
    """A worker starting a job reads the request and the queue from its record: two HGETs, two round trips for every
    job, before. One HMGET now."""
    from test_worker_exit import make_runner
    from workers.builder import load_model

    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    pool = redis.ConnectionPool.from_url(redis_server.url, decode_responses=True, connection_class=Recording)
    store = JobStore(redis.Redis(connection_pool=pool), prefix=f"llq-s18-{uuid.uuid4().hex[:8]}")
    runner, engine = make_runner(store, loaded, "w1")
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=1),
                                 "interactive")
        Recording.sent.clear()
        assert runner.run(job_id) == "succeeded"
    finally:
        engine.shutdown()
    reads = [request for request in Recording.sent
             if request[0] in ("HGET", "HMGET", "HGETALL") and request[1] == store.key(job_id)]
    assert reads == [["HMGET", store.key(job_id)]], Recording.sent
    assert store.request_and_queue(job_id) == (GenerateRequest(prompt="Once upon a time", temperature=0,
                                                               max_new_tokens=1), "interactive")
    assert (store.request_of(job_id).prompt, store.queue_of(job_id)) == ("Once upon a time", "interactive")
    assert store.request_and_queue("no-such-job") == (None, None)
