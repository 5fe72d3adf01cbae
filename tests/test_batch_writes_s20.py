"""A batch's jobs are written on one pipeline, not one MULTI (hundreds of lines would hold Redis for the whole write):
a connection cut part-way must still leave each job either written whole or not at all. Its writes were plain
commands, the images' holds before the record: a cut between them left an image counted for a record never written,
and so stored for good."""

import base64
import io
import socket
import threading
import uuid

import pytest
import redis
from PIL import Image

from redis_proxies import CuttingProxy
from shared.jobs import JobStore
from shared.protocol import GenerateRequest


def small_png(seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (seed, 0, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class RequestCuttingProxy(CuttingProxy):
    """A TCP proxy before a real Redis server that, once told to (`cut_after`), passes on that many more bytes from
    the client and then closes both sides: the command being sent is cut off, as by an API killed or a network lost
    part-way through a write. `passed` counts the bytes it has passed on from clients."""

    def __init__(self, upstream_port: int):
        self.passed = 0
        self._left: int | None = None
        self._lock = threading.Lock()
        super().__init__(upstream_port)

    def cut_after(self, count: int) -> None:
        with self._lock:
            self._left = count

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                cut = False
                if from_client:
                    with self._lock:
                        if self._left is not None:
                            data, cut = data[: self._left], len(data) >= self._left
                            self._left = None if cut else self._left - len(data)
                        self.passed += len(data)
                target.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        self._close_both(source, target)


def assert_whole(store: JobStore, queue: str) -> int:
    """Every job written is whole: its queue entry, and a hold on each of its images, which are stored; every image
    is held as many times as records name it. Returns how many jobs there are."""
    records = [store.redis.hgetall(key) for key in store.redis.scan_iter(f"{store.prefix}:job:*")]
    held: dict[str, int] = {}
    for record in records:
        assert store.redis.zscore(store.queue_key(queue), record["id"]) is not None, record["id"]
        for key in record["image_keys"].split():
            held[key] = held.get(key, 0) + 1
    stored = {key: int(store.redis.hget(key, "refs")) for key in store.redis.scan_iter(f"{store.prefix}:image:*")}
    assert stored == held
    assert store.redis.zcard(store.queue_key(queue)) == len(records)
    assert int(store.redis.hget(store.submitted_key, queue) or 0) == len(records)
    return len(records)


def test_a_batch_write_cut_off_part_way_leaves_each_job_whole_or_unwritten(redis_server):
    prefix = f"llq-cut-{uuid.uuid4().hex[:8]}"
    direct = JobStore.from_url(redis_server.url, prefix=prefix)
    proxy = RequestCuttingProxy(redis_server.port)
    store = JobStore.from_url(proxy.url, prefix=prefix)
    try:
        images = [small_png(seed) for seed in range(3)]  # a job's record outweighs its image: cuts fall in both
        lines = [GenerateRequest(prompt=f"<image>\nQuestion {index}?", images=[images[index % 3]])
                 for index in range(8)]
        store.create_many(lines[:1], "batch")  # the connection made and the scripts loaded, before bytes are counted
        before = proxy.passed
        store.create_many(lines, "batch")
        whole = proxy.passed - before
        written = len(lines) + 1
        assert assert_whole(direct, "batch") == written
        cuts = range(whole // 60, whole, whole // 60)
        for cut in cuts:
            store.redis.ping()
            proxy.cut_after(cut)
            with pytest.raises(redis.ConnectionError):
                store.create_many(lines, "batch")
            count = assert_whole(direct, "batch")
            assert written <= count < written + len(lines), (cut, whole)
            written = count
        assert written > len(lines) * 2, "no cut fell between two jobs"
    finally:
        proxy.close()
