"""The broker runs on the project's kombu transport (shared.celery_app.RedisTransport, its channel `_Channel`) for every
URL the job store reads: a Redis on a unix socket (unix://) and one behind TLS (rediss://) as well as redis://. They
ran on kombu's own, and lost what the project's channel does: a message on a queue that is no task was no longer set
aside (the worker's consumer died on it), and no worker was recorded as holding a message (a SIGKILLed worker's job
waited out the 4-hour visibility timeout). And the broker verifies the Redis's TLS certificate as the job store does:
kombu's own default for rediss:// is not to verify.

Real servers only: a Valkey on a unix socket, and a Valkey behind a TLS-terminating proxy (Valkey's embedded build has
no TLS), with certificates made by the `openssl` command."""

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import job_final, run_stack, wait_answers

from shared.celery_app import DEAD_LETTERS_KEY, MESSAGE_HOLDERS_KEY, RedisTransport, make_celery
from shared.redis_server import RedisServer, find_server_binary, free_port
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
NOT_A_TASK = "not a task message (s41)"
STORY = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost (with its key), and another CA that signed
    nothing here (a stranger): their PEM files in `folder`."""
    if shutil.which("openssl") is None:
        pytest.skip("no `openssl` command to make the test's TLS certificates with (and no `cryptography` package)")
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key", "stranger",
                                                         "stranger-key")}
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    for ca in ("ca", "stranger"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=llava-queue test {ca}",
                "-keyout", str(paths[f"{ca}-key"]), "-out", str(paths[ca]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(paths["server-key"]),
            "-out", "server.csr")
    openssl("x509", "-req", "-in", "server.csr", "-CA", str(paths["ca"]), "-CAkey", str(paths["ca-key"]),
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", str(paths["server"]))
    return paths


class TlsProxy:
    """What a managed Redis's TLS endpoint is to its clients: takes TLS connections on `port` with the certificate
    `certfile` and forwards their bytes to the Redis at `upstream_port` (asyncio, on a thread of its own)."""

    def __init__(self, upstream_port: int, certfile: Path, keyfile: Path):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certfile, keyfile)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()  # (client, upstream) writers
        listening = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(listening,), daemon=True)
        self._thread.start()
        assert listening.wait(10), "the TLS proxy did not start"

    def _run(self, listening: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connected, "127.0.0.1", self.port, ssl=self._context))
        listening.set()
        self._loop.run_forever()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._open.add((writer, upstream_writer))
        try:
            await asyncio.gather(self._pump(reader, upstream_writer), self._pump(upstream_reader, writer))
        finally:
            self._open.discard((writer, upstream_writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass  # the other end went away: its connection ends too
        finally:
            writer.close()

    async def _shut(self) -> None:
        self._server.close()
        for writers in list(self._open):
            for writer in writers:
                writer.transport.abort()  # each pump ends: its reader sees the end
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "TlsProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def runs_on_the_projects_channel(stack, client: redis.Redis) -> None:
    """What the project's channel does on the stack's worker, seen in the Redis `client` reads (the stack's database):
    an entry on a queue that is no task is set aside and the worker goes on; a job's message, while its job runs, is
    recorded with the worker that holds it; the job succeeds."""
    client.delete(DEAD_LETTERS_KEY)
    client.lpush("interactive", NOT_A_TASK)
    deadline = time.monotonic() + 60
    while client.lrange(DEAD_LETTERS_KEY, 0, -1) != [NOT_A_TASK.encode()]:
        assert time.monotonic() < deadline and stack.processes["worker"].poll() is None, (
            "the entry that is no task was not set aside, and the worker went on" if stack.processes["worker"].poll()
            is None else "the worker exited on an entry that is no task", stack.logs())
        time.sleep(0.1)

    submitted = requests.post(f"{stack.base_url}/v1/jobs", timeout=30,
                              json={"messages": STORY, "temperature": 0, "max_new_tokens": 96})
    assert submitted.status_code in (200, 201, 202), (submitted.text, stack.logs())
    job_id = submitted.json()["id"]
    holders = {}
    deadline = time.monotonic() + 120
    while not holders:
        holders = client.hgetall(MESSAGE_HOLDERS_KEY)
        status = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"]
        assert holders or (status in ("queued", "running") and time.monotonic() < deadline), (
            f"the job is {status} and no worker was recorded holding its message", stack.logs())
    assert all(client.exists(holder) for holder in holders.values()), holders  # the worker's registry key
    job = job_final(stack, job_id, timeout=240)
    assert job["status"] == "succeeded" and job["text"], (job, stack.logs())
    assert stack.processes["worker"].poll() is None
    assert "set aside in llava_queue.dead_letters" in (stack.log_dir / "worker.log").read_text()


def test_a_stack_on_a_unix_socket_runs_on_the_projects_channel(tmp_path, default_model_dir):
    # unix:// reached Celery as kombu's redis+socket://, whose scheme named kombu's own transport: the worker's
    # consumer died on the first entry of its queue that was no task, and no holder of a message was recorded.
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen([find_server_binary(), "--port", "0", "--unixsocket", str(socket_path),
                               "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(unix_socket_path=str(socket_path), db=2)
    try:
        wait_answers(client, server)
        with run_stack(f"unix://{socket_path}?db=2", {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                                                      "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}) as stack:
            runs_on_the_projects_channel(stack, client)
    finally:
        client.close()
        server.terminate()
        server.wait(10)


def test_a_stack_on_rediss_runs_on_the_projects_channel(tmp_path, default_model_dir):
    # rediss:// kept kombu's own transport too. The URL names the CA that signed the Redis's certificate, as an
    # operator of a Redis with a private CA does; the broker and the job store both verify the certificate with it.
    certificates = make_certificates(tmp_path)
    with RedisServer() as server, TlsProxy(server.port, certificates["server"], certificates["server-key"]) as proxy:
        url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={certificates['ca']}"
        client = redis.Redis.from_url(url)
        with run_stack(url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                             "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}) as stack:
            runs_on_the_projects_channel(stack, client)
        client.close()


def broker_refusal(url: str) -> str | None:
    """How the broker of `make_celery` for `url` fails to send a message (its error), or None where it was sent: on
    a connection of its own (kombu's pools are shared by every connection to one address, whatever its TLS options)."""
    with make_celery(Settings(redis_url=url)).connection_for_write() as connection:
        try:
            connection.ensure_connection(max_retries=1)
            connection.Producer().publish({"check": url}, routing_key="s41-tls-check", declare=[], retry=False)
        except Exception as exc:  # redis-py's ConnectionError, or kombu's OperationalError around it
            return f"{type(exc).__name__}: {exc}"
    return None


def job_store_refusal(url: str) -> str | None:
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def test_the_broker_verifies_the_redis_certificate_as_the_job_store_does(tmp_path):
    # kombu's own rediss:// without ssl_cert_reqs did not verify the certificate ("defaulting to insecure SSL
    # behaviour"): anyone on the path could read and change the task messages while the job store, redis-py,
    # refused the same server. Now one URL means one behaviour for both.
    certificates = make_certificates(tmp_path)
    with RedisServer() as server, TlsProxy(server.port, certificates["server"], certificates["server-key"]) as proxy:
        base = f"rediss://127.0.0.1:{proxy.port}/0"
        sent = redis.Redis.from_url(server.url)
        for query, refused in (("", True), (f"?ssl_ca_certs={certificates['stranger']}", True),
                               (f"?ssl_cert_reqs=required&ssl_ca_certs={certificates['stranger']}", True),
                               (f"?ssl_ca_certs={certificates['ca']}", False), ("?ssl_cert_reqs=none", False),
                               (f"?ssl_cert_reqs=optional&ssl_ca_certs={certificates['ca']}", False)):
            sent.delete("s41-tls-check")
            broker, job_store = broker_refusal(base + query), job_store_refusal(base + query)
            if refused:
                assert broker and "CERTIFICATE_VERIFY_FAILED" in broker, (query, broker)
                assert job_store and "CERTIFICATE_VERIFY_FAILED" in job_store, (query, job_store)
                assert sent.llen("s41-tls-check") == 0, query
            else:
                assert broker is None and job_store is None, (query, broker, job_store)
                assert sent.llen("s41-tls-check") == 1, query  # through the TLS proxy, into the Redis
        sent.close()
        with make_celery(Settings(redis_url=base)).connection_for_write() as connection:
            assert type(connection.transport) is RedisTransport, connection.transport  # the project's, its channel


def test_a_redis_whose_certificate_is_not_trusted_is_refused_at_start_saying_so(tmp_path):
    # A certificate the URL's CA did not sign failed every connection of the job store: `api` and `worker` took it
    # for a Redis not up yet and waited for it for ever, the API answering every submission 503.
    certificates = make_certificates(tmp_path)
    with RedisServer() as server, TlsProxy(server.port, certificates["server"], certificates["server-key"]) as proxy:
        url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={certificates['stranger']}"
        for args in (["api", "--port", str(free_port())], ["worker"]):
            try:
                run = subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, capture_output=True,
                                     text=True, timeout=90, env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=url))
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"`llava-queue {args[0]}` did not refuse the URL: {exc.stderr!r:.2000}") from None
            assert run.returncode == 2 and "Traceback" not in run.stderr, (args, run.stderr[-2000:])
            assert "its TLS certificate is not trusted (" in run.stderr, run.stderr[-2000:]
            assert "?ssl_ca_certs=" in run.stderr and "loaded" not in run.stderr, run.stderr[-2000:]
