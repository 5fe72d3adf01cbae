"""The queue layer against Celery-on-Redis traps: a broker connection that died without closing."""

import socket
import threading
import time

from api.errors import ApiError
from redis_proxies import CuttingProxy
from shared.celery_app import BROKER_SOCKET_TIMEOUT_SECONDS
from shared.redis_server import RedisServer
from test_submission import make_submitter, one, queued_messages


class FreezingProxy(CuttingProxy):
    """Forwards every connection until `freeze`: from then on, the connections already open forward nothing, and
    stay open (what a NAT or firewall that forgot an idle connection, or a failover, leaves a client with); new ones
    are forwarded."""

    def __init__(self, upstream_port: int):
        self._frozen: set[socket.socket] = set()
        self._open: set[socket.socket] = set()
        super().__init__(upstream_port)

    def _connected(self, client: socket.socket, upstream: socket.socket) -> None:
        self._open.add(client)
        super()._connected(client, upstream)

    def freeze(self) -> None:
        self._frozen |= self._open

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        client = source if from_client else target
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._close_both(source, target)
                return
            if client not in self._frozen:
                target.sendall(data)


def test_a_submission_whose_broker_connection_died_unclosed_is_answered_and_the_next_one_is_sent():
    """A broker connection that died without closing answers nothing. With no socket timeout (kombu's default) the
    send of a submission's task on it waited for ever, and with it every later submission of that API, which commit
    one group at a time. Now it fails after BROKER_SOCKET_TIMEOUT_SECONDS (a 503, its job failed), and the next
    submission goes out on a new connection."""
    with RedisServer() as server:
        proxy = FreezingProxy(server.port)
        submitter, store = make_submitter(server.url, broker_url=proxy.url)
        store.release.set()
        first = submitter.submit(*one("before")[0])
        proxy.freeze()

        answers: list = []

        def submit(prompt: str) -> None:
            try:
                answers.append(submitter.submit(*one(prompt)[0]))
            except ApiError as exc:
                answers.append(exc)

        started = time.monotonic()
        stuck = threading.Thread(target=submit, args=("on the dead connection",), daemon=True)
        stuck.start()
        stuck.join(BROKER_SOCKET_TIMEOUT_SECONDS + 20)
        assert not stuck.is_alive(), "the submission still waits for an answer on a dead broker connection"
        assert time.monotonic() - started < BROKER_SOCKET_TIMEOUT_SECONDS + 20
        if isinstance(answers[0], ApiError):  # the connection's death was found at the send: a 503 the client retries
            assert answers[0].status == 503
            statuses = [store.redis.hget(key, "status") for key in store.redis.scan_iter("sub:job:*")]
            assert sorted(statuses) == ["failed", "queued"]  # its job says so; none waits queued with no task
        after = threading.Thread(target=submit, args=("after",), daemon=True)
        after.start()
        after.join(BROKER_SOCKET_TIMEOUT_SECONDS + 20)
        assert not after.is_alive()
        assert isinstance(answers[-1], list), answers
        assert answers[-1][0] in queued_messages(store)
        assert first[0] in queued_messages(store)
        proxy.close()
