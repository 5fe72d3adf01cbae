"""TCP proxies before a real Redis server that cut connections at chosen moments (what a network, a proxy or a
process killed part-way does to a write)."""

import socket
import threading

from shared.redis_server import free_port


class CuttingProxy:
    """Forwards every connection to the Redis at `upstream_port`, one thread each way; `_pump` (a subclass's) decides
    where a connection is cut."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._connected(client, upstream)

    def _connected(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool) -> None:
        raise NotImplementedError

    @staticmethod
    def _close_both(source: socket.socket, target: socket.socket) -> None:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the other pump, and the client sees the connection end
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()
