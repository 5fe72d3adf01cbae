"""The `llava-queue` command: `up` runs the whole stack; `api` and `worker` run one piece each;
`status` shows queues and workers; `eval` answers an original question file through the queue."""

import argparse
import ctypes
import errno
import logging
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import ValidationError
from pydantic_settings import SettingsError

from shared.cpus import keep_to, split_cpus
from shared.eval_cli import add_eval_parser
from shared.logs import setup_logging
from shared.redis_server import BindError, DataDirError, RedisServer, bind_error, bound_sockets
from shared.settings import get_settings, redis_url_problem, unknown_variables

log = logging.getLogger("llava_queue")


def _die_with_parent() -> None:
    # Children get SIGTERM if `up` itself dies, even by SIGKILL: none is left behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_setup(cpus: frozenset[int] = frozenset(), die_with_parent: bool = True):
    """A child's preexec_fn: it dies with `up` (unless not `die_with_parent`), and runs on `cpus` (all of the
    parent's when empty)."""
    def setup() -> None:
        if die_with_parent:
            _die_with_parent()
        keep_to(cpus)
    return setup


def _spawn(args: list[str], env: dict[str, str], cpus: frozenset[int] = frozenset()) -> subprocess.Popen:
    # A session of its own: Ctrl-C in a terminal signals the foreground process group, and `up` alone must get it,
    # to stop its children in order (the worker hands its jobs back while Redis is still there).
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env, preexec_fn=_child_setup(cpus),
                            start_new_session=True)


def _stop(processes: list[subprocess.Popen], timeout: float, hurry=lambda: False) -> None:
    """SIGTERM each process and wait for all of them until `timeout`, or until `hurry()`; then SIGKILL the rest."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    while any(process.poll() is None for process in processes) and time.monotonic() < deadline and not hurry():
        time.sleep(0.1)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_ready(url: str, children: list[subprocess.Popen], timeout: float, stopped=lambda: False) -> bool:
    """Wait until the API answers and a worker has announced itself; False if a child died, `timeout` passed, or
    `stopped()` (Ctrl-C while starting)."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopped() or any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if json.load(response).get("workers"):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _ended(processes: dict[str, subprocess.Popen]) -> str | None:
    """The first of `processes` (by name) that has exited, and how, or None while all run."""
    for name, process in processes.items():
        if process.poll() is not None:
            return f"{name} exited (status {process.returncode})"
    return None


def _address(args: argparse.Namespace) -> tuple[str, int]:
    """Where the API listens: --host and --port, else LLAVA_QUEUE_HOST and _PORT (`api` and `up` alike). `--port 0` is
    a port too (a free one, which the log names): not "unset"."""
    settings = get_settings()
    return args.host or settings.host, settings.port if args.port is None else args.port


def _port_problem(host: str, port: int) -> str | None:
    """Why the API could not listen on host:port, or None: `up` checks it before it starts Redis and a worker (the
    API it starts then binds the port itself, see _listen)."""
    error = bind_error(host, port)  # as the API binds
    return None if error is None else _listen_problem(host, port, error)


def _listen(host: str, port: int) -> list[socket.socket]:
    """The API's listening sockets, one for each address `host` names (`bound_sockets`), bound before the app
    starts. uvicorn binding them itself did so after the app's lifespan had started: a port taken in between
    (another API starting on it) failed there, and the process hung in the lifespan's end instead of exiting."""
    sockets = bound_sockets(host, port)
    for sock in sockets:
        try:
            sock.listen(2048)  # uvicorn's backlog; listening now claims the port (a bound socket alone does not)
        except OSError as exc:
            address = sock.getsockname()[0]
            for each in sockets:
                each.close()
            raise BindError(exc, address) from exc
    return sockets


def _url_host(host: str) -> str:
    """The host as a URL writes it: an IPv6 address in brackets (`up --host ::1` printed http://::1:8000, which no
    browser opens)."""
    return f"[{host}]" if ":" in host else host


def _listen_problem(host: str, port: int, error: OSError, option: str = "--port") -> str:
    """What a failed bind of host:port means for the operator; which address failed, for a name that has several."""
    where = f"{_url_host(host)}:{port}"
    if isinstance(error, BindError) and error.address != host:
        where += f" ({error.address})"
    if error.errno == errno.EADDRINUSE:
        return f"{where} is in use by another process; choose another port ({option})"
    return f"cannot listen on {where}: {error.strerror or error}"


def _redis_url_problem(url: str) -> str | None:
    """Why redis-py cannot use `url` at all, or None. The settings take kombu's other schemes (sentinel://,
    redis+socket://) as Celery does, but the job records are read through redis-py, which cannot: every command
    failed with a traceback (the API's after it had started)."""
    import redis

    from shared.status import without_password

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError as exc:
        return f"LLAVA_QUEUE_REDIS_URL={without_password(url)!r}: {exc}"
    # A database this Redis does not have is refused on every connection: the API answered 503 to everything and
    # the worker tried again for ever, as if Redis were away. A Redis that does not answer (yet) is waited for.
    try:
        client.ping()
    except redis.ResponseError as exc:
        if "DB index" in str(exc):
            return (f"LLAVA_QUEUE_REDIS_URL={without_password(url)!r}: the Redis there refuses its database ({exc}); "
                    "its `databases` setting says how many it has, 16 by default (0 to 15)")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        problem = _tls_problem(url, exc)
        if problem:
            return f"LLAVA_QUEUE_REDIS_URL={without_password(url)!r}: {problem}"
    except redis.RedisError:
        pass
    finally:
        client.close()
    return None


def _tls_problem(url: str, error: Exception) -> str | None:
    """Why the rediss:// `url` can never connect, given the `error` of a try, or None: its certificate is not trusted
    (redis-py's error is caused by the handshake's), or the Redis at its address speaks no TLS (a PING in plain text
    gets a RESP reply, +PONG or an error such as NOAUTH; a TLS server answers it with an alert, or not at all): such
    a Redis reads the client's TLS hello as the start of a command and waits for the rest. `api` and `worker` took
    either for a Redis not up yet, and waited for it for ever."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    if isinstance(error.__cause__, ssl.SSLCertVerificationError):
        return (f"its TLS certificate is not trusted ({error.__cause__.verify_message}): name the CA that signed it "
                "(?ssl_ca_certs=/path/to/ca.pem), or turn verification off (?ssl_cert_reqs=none)")
    try:
        address = (parts.hostname or "localhost", parts.port or 6379)
        with socket.create_connection(address, timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(1) not in (b"+", b"-"):
                return None
    except (OSError, ValueError):  # no answer; ValueError: a port out of range
        return None
    return (f"the Redis at {_url_host(address[0])}:{address[1]} speaks no TLS (the TLS handshake got no answer, a "
            "plain PING did): use redis:// for it, or the port where it takes TLS (its tls-port)")


def _redis_refusal_problem(settings, **checks) -> str | None:
    """Why Redis refuses this command for good (its credentials, protected mode, an ACL without what it runs, with
    `checks` those of `redis_refusal`), or None; a Redis that does not answer (yet) is waited for. Such an API
    started and tried its pub/sub connection again for ever; such a worker loaded its model, then did."""
    import redis

    from shared.celery_app import redis_refusal
    from shared.status import without_password

    try:
        refusal = redis_refusal(settings.redis_url, settings.key_prefix, **checks)
    except redis.RedisError:
        return None
    return f"Redis at {without_password(settings.redis_url)}: {refusal}" if refusal else None


def _frontend_problem(folder: Path | None) -> str | None:
    """Why the API cannot serve the page from LLAVA_QUEUE_FRONTEND_DIR, or None (unset: the page beside the code). A
    folder that is not there, or has no index.html, started an API whose page answered 404, unsaid."""
    if folder is not None and not (folder.expanduser() / "index.html").is_file():
        what = "has no index.html" if folder.expanduser().is_dir() else "is not a folder"
        return (f"LLAVA_QUEUE_FRONTEND_DIR={str(folder)!r} {what}: name the page's folder (the project's frontend/), "
                "or leave it unset")
    return None


def _data_roots_problem(roots: list[Path]) -> str | None:
    """Why the API cannot read server-side files under LLAVA_QUEUE_DATA_ROOTS, or None: a root that is no folder (a
    typo, a volume not mounted). It was taken, and every batch naming a file there was answered "not found", naming
    neither the setting nor the root."""
    for root in roots:
        if not root.expanduser().is_dir():
            what = "is not a folder" if root.expanduser().exists() else "does not exist"
            return (f"LLAVA_QUEUE_DATA_ROOTS: {str(root)!r} {what}: name the folders batch files and image folders are "
                    "read from, or leave it empty (uploads only)")
    return None


def _conversation_log_problem(path: str) -> str | None:
    """Why the worker cannot append to LLAVA_QUEUE_CONVERSATION_LOG, or None (empty: off). The file is created now,
    as the first finished job would: one that cannot be (a folder not writable, a parent that is a file) failed
    every job's line later, each with a traceback in the log."""
    if not path.strip():
        return None
    file = Path(path).expanduser()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with open(file, "a", encoding="utf-8"):
            pass
    except FileExistsError as exc:  # mkdir's, where a folder of the path is a file
        return f"LLAVA_QUEUE_CONVERSATION_LOG={path!r} cannot be written: {exc.filename} is a file, not a folder"
    except OSError as exc:
        return f"LLAVA_QUEUE_CONVERSATION_LOG={path!r} cannot be written: {exc.strerror or exc}"
    return None


def _broker_problem(app, what: str) -> str | None:
    """Why Celery `app` cannot send or take jobs through its broker URL (`what` names where the URL came from), or
    None; connects to nothing. A URL redis-py reads and Celery's kombu does not started an API that answered every
    submission 503 ("No such transport: ..."), and a worker that loaded its model, then failed with kombu's traceback
    (unix:// did, before make_celery gave kombu its redis+socket:// form: `broker_url`)."""
    try:
        with app.connection_for_write() as connection:
            connection.transport  # the URL's transport, resolved and built
    except (KeyError, ImportError, ValueError) as exc:
        said = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return (f"{what}: Celery, which carries the jobs, cannot use it ({said}); use redis://host:port/db "
                "(rediss:// for TLS)")
    return None


def _redis_problem(url: str) -> str | None:
    """Why the Redis at `url` (`up --redis-url`) cannot be used now, or None (the password masked): the checks that
    `api` and `worker` make of LLAVA_QUEUE_REDIS_URL, made before anything starts. Missed here (a database that is
    no number, an ACL without scripts), `up` started a worker and an API that each refused it."""
    import redis

    from shared.celery_app import make_celery, redis_refusal
    from shared.status import without_password

    # The settings' own check of a URL: `up --redis-url` does not go through them (an option of the query redis-py
    # does not take ended `up` with a traceback).
    problem = redis_url_problem(url)
    if problem:
        return f"--redis-url {without_password(url)}: {problem}"
    settings = get_settings().model_copy(update={"redis_url": url})
    problem = _broker_problem(make_celery(settings), f"--redis-url {without_password(url)}")
    if problem:
        return problem
    try:
        refusal = redis_refusal(url, settings.key_prefix, names_connections=True, writes=True)
    except ValueError as exc:  # a scheme redis-py does not read (sentinel://)
        return f"--redis-url {without_password(url)}: {exc}"
    except redis.RedisError as exc:
        problem = _tls_problem(url, exc)
        if problem:
            return f"Redis at {without_password(url)}: {problem}"
        return f"Redis at {without_password(url)} does not answer: {exc}"
    return f"Redis at {without_password(url)}: {refusal}" if refusal else None


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded Redis (unless --redis-url), one worker, the API; Ctrl-C stops them all."""
    # A variable that is no setting has been named once (main); the children, which ignore it too, do not repeat it.
    env = {name: value for name, value in os.environ.items() if not unknown_variables({name: value})}
    redis_server = None
    stopping = hurry = False

    def on_signal(signum, _frame):
        # The first signal stops the stack in order; a second one while it stops kills what is left.
        nonlocal stopping, hurry
        hurry = stopping
        stopping = True

    try:
        split = split_cpus(get_settings().engine_cpus)
    except ValueError as exc:
        print(f"llava-queue: {exc}", file=sys.stderr, flush=True)
        return 2
    # With engine cores, Redis and the API keep off them (the worker moves its own other threads off them).
    rest = split.rest
    # LLAVA_QUEUE_HOST and _PORT as `api` reads them: `up` passed its own defaults to the API, so with the variable
    # set (`LLAVA_QUEUE_PORT=9000 bash scripts/up.sh`) the stack came up on 8000, unsaid.
    host, port = _address(args)
    if port == 0:
        print("llava-queue: LLAVA_QUEUE_PORT=0: `up` waits for the API at its port and prints its address, so it "
              "needs a fixed one (1 to 65535, or --port)", file=sys.stderr, flush=True)
        return 2
    problem = _port_problem(host, port) or _data_roots_problem(get_settings().data_roots)
    if problem:
        print(f"llava-queue: {problem}", file=sys.stderr, flush=True)
        return 2
    if args.redis_url:
        problem = _redis_problem(args.redis_url)
        if problem:
            print(f"llava-queue: {problem}", file=sys.stderr, flush=True)
            return 2
        env["LLAVA_QUEUE_REDIS_URL"] = args.redis_url
    # From here on what starts is stopped in order, so a signal only says to stop. Before, nothing has started: a
    # Ctrl-C (KeyboardInterrupt) ends the command at once, quietly (shared/entry.py), even in a check that waits for
    # a Redis that does not answer. Set after the embedded Redis had started, a Ctrl-C as it started raised in its
    # start and could leave it running.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if not args.redis_url:
        data_dir = None if args.ephemeral_redis else (args.redis_dir or get_settings().cache_dir / "redis")
        try:
            # Not stopped with the others if `up` dies (SIGKILL): its keeper stops it once the worker has handed
            # its running jobs back through it (with it gone at once, the worker waited for it, left behind).
            redis_server = RedisServer(port=args.redis_port, data_dir=data_dir).start(
                keep_for=get_settings().shutdown_grace_seconds + 15,
                preexec_fn=_child_setup(rest, die_with_parent=False), start_new_session=True)
        except DataDirError as exc:
            # What names the folder: the default one is under CACHE_DIR, which the operator may not know `up` writes.
            if args.redis_dir:
                where, other = "--redis-dir", "name another folder (--redis-dir)"
            else:
                where = f"the default --redis-dir, redis/ under LLAVA_QUEUE_CACHE_DIR={str(get_settings().cache_dir)!r}"
                other = "name another folder (--redis-dir, or LLAVA_QUEUE_CACHE_DIR)"
            print(f"llava-queue: cannot start the embedded Redis: {exc} ({where}); {other}, or none "
                  "(--ephemeral-redis)", file=sys.stderr, flush=True)
            return 2
        except (RuntimeError, OSError) as exc:  # OSError: a server binary it cannot run
            print(f"llava-queue: cannot start the embedded Redis: {exc}", file=sys.stderr, flush=True)
            return 2
        env["LLAVA_QUEUE_REDIS_URL"] = redis_server.url
        kept = f", jobs kept in {data_dir}" if data_dir else ", nothing kept after it stops"
        print(f"llava-queue: embedded Redis ({os.path.basename(redis_server.binary)}) at {redis_server.url}{kept}",
              flush=True)
    if args.model_path:
        env["LLAVA_QUEUE_MODEL_PATH"] = args.model_path
    children: list[subprocess.Popen] = []
    if stopping:
        # Told to stop while the embedded Redis started, or just after the checks: nothing else was started.
        if redis_server:
            redis_server.stop()
        return 130
    try:
        children.append(_spawn(["worker"], env))
        children.append(_spawn(["api", "--host", host, "--port", str(port)], env, rest))
        if redis_server:
            for child in children:
                redis_server.outlived_by(child.pid)
        url = f"http://{_url_host(host)}:{port}"
        print("llava-queue: starting the worker (the first start fetches and converts the default model)...",
              flush=True)
        if _wait_ready(url, children, timeout=args.start_timeout, stopped=lambda: stopping):
            print(f"llava-queue is up: API {url}  (docs {url}/docs, health {url}/healthz). Ctrl-C stops it.",
                  flush=True)
        elif not stopping:
            ended = _ended({"the worker": children[0], "the API": children[1]})
            if ended:
                print(f"llava-queue: a process failed to start ({ended}); stopping", file=sys.stderr, flush=True)
            else:
                print(f"llava-queue: not up after {args.start_timeout:g} s (--start-timeout); stopping",
                      file=sys.stderr, flush=True)
            return 1
        # The embedded Redis is watched too: without it the API and the worker run on, and fail every request.
        watched = {"the worker": children[0], "the API": children[1]}
        if redis_server:
            watched["the embedded Redis"] = redis_server.process
        while not stopping and not (ended := _ended(watched)):
            time.sleep(0.2)
        if stopping:
            return 0
        print(f"llava-queue: {ended}; stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        # The API and the worker first: the worker finishes its running jobs within the grace period and hands
        # back the rest, which needs Redis; Redis last.
        grace = get_settings().shutdown_grace_seconds
        print(f"llava-queue: stopping (the worker finishes or hands back its jobs within {grace:g} s; "
              "Ctrl-C again stops now)", flush=True)
        _stop(children, timeout=grace + 15, hurry=lambda: hurry)
        if redis_server:
            redis_server.stop()


def cmd_api(args: argparse.Namespace) -> int:
    """The API alone, against LLAVA_QUEUE_REDIS_URL."""
    import uvicorn

    from api.main import GRACEFUL_SHUTDOWN_SECONDS, KEEP_ALIVE_SECONDS, ApiServer, app
    from shared.celery_app import celery_app
    from shared.heap import freeze_startup_heap
    from shared.status import without_password

    settings = get_settings()
    host, port = _address(args)
    problem = (_frontend_problem(settings.frontend_dir) or _data_roots_problem(settings.data_roots)
               or _redis_url_problem(settings.redis_url)
               or _broker_problem(celery_app, f"LLAVA_QUEUE_REDIS_URL={without_password(settings.redis_url)!r}")
               or _redis_refusal_problem(settings, names_connections=True))
    if problem:
        print(f"llava-queue api: {problem}", file=sys.stderr, flush=True)
        return 2
    try:
        sockets = _listen(host, port)
    except OSError as exc:
        print(f"llava-queue api: {_listen_problem(host, port, exc, '--port or LLAVA_QUEUE_PORT')}", file=sys.stderr,
              flush=True)
        return 2
    api_log = logging.getLogger("llava_queue.api")
    # A name's addresses too: `localhost` may name 127.0.0.1 and ::1, or one of them only.
    addresses = " and ".join(sock.getsockname()[0] for sock in sockets)
    api_log.info("listening on http://%s:%d%s", _url_host(host), sockets[0].getsockname()[1],
                 "" if addresses == host else f" ({addresses})")
    if not settings.api_key_hashes:
        # Said here, where the address is known (--host, else LLAVA_QUEUE_HOST): the app named LLAVA_QUEUE_HOST's.
        api_log.warning("no API keys configured (LLAVA_QUEUE_API_KEY_HASHES): anyone who can reach the API can "
                        "submit jobs; it listens on %s, port %d", addresses, sockets[0].getsockname()[1])
    # The app is built (FastAPI, pydantic, every route): keep all of that out of full collections.
    api_log.info("%d start-up objects frozen out of full garbage collections", freeze_startup_heap())
    # log_level None: uvicorn's loggers follow LLAVA_QUEUE_LOG_LEVEL (the root's, setup_logging); "info" set them to
    # INFO whatever it said, so its access lines stayed at WARNING and its debug lines never came at DEBUG.
    config = uvicorn.Config(app, host=host, port=port,
                            log_level=None, log_config=None, ws_ping_interval=20,
                            # A request on `WS /v1/ws` may be as large as a POST's body (uvicorn's own limit, 16 MiB,
                            # refused a job a POST takes); a larger message closes the socket with 1009.
                            ws_max_size=settings.max_body_bytes,
                            ws_per_message_deflate=settings.ws_compression,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, timeout_keep_alive=KEEP_ALIVE_SECONDS)
    try:
        ApiServer(config).run(sockets=sockets)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has stopped the API, then raised the SIGINT it held back
        return 0
    except SystemExit as exc:  # uvicorn's way out when the app (its lifespan) or the server fails to start
        if not exc.code:
            raise
        print("llava-queue api: the API failed to start (the error is logged above)", file=sys.stderr, flush=True)
        return 1
    finally:
        for sock in sockets:
            sock.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker alone, against LLAVA_QUEUE_REDIS_URL."""
    from shared.celery_app import celery_app
    from shared.status import without_password
    from workers.builder import ModelLoadError, resolve_device
    from workers.main import run_worker

    try:
        split_cpus(get_settings().engine_cpus)
    except ValueError as exc:
        print(f"llava-queue worker: {exc}", file=sys.stderr)
        return 2
    # Before the model loads, not after.
    # The Redis refusal before the model loads: a read-only replica too, where Celery's consumer cannot start.
    settings = get_settings()
    problem = (_conversation_log_problem(settings.conversation_log) or _redis_url_problem(settings.redis_url)
               or _broker_problem(celery_app, f"LLAVA_QUEUE_REDIS_URL={without_password(settings.redis_url)!r}")
               or _redis_refusal_problem(settings, writes=True))
    if problem:
        print(f"llava-queue worker: {problem}", file=sys.stderr)
        return 2
    try:
        resolve_device(get_settings().device)
    except (RuntimeError, ValueError) as exc:
        print(f"llava-queue worker: LLAVA_QUEUE_DEVICE={get_settings().device!r} cannot be used: {exc} "
              "(use auto, cpu, cuda or cuda:N)", file=sys.stderr)
        return 2
    from workers.metrics import ExporterError

    try:
        run_worker(get_settings())
    except ModelLoadError as exc:
        print(f"llava-queue worker: cannot serve the model: {exc}", file=sys.stderr)
        return 2
    except ExporterError as exc:
        print(f"llava-queue worker: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The queues and workers as a table, read from Redis; again every --watch seconds."""
    from shared.status import run_status

    # A Redis that refuses the credentials (or wants some) is said so, exit 2, as `api` and `worker` say it: it was
    # "does not answer" (exit 1), with the server's words ("HELLO must be called with the client already
    # authenticated").
    problem = (_redis_url_problem(get_settings().redis_url)
               or _redis_refusal_problem(get_settings(), commands=False))
    if problem:
        print(f"llava-queue status: {problem}", file=sys.stderr)
        return 2
    return run_status(get_settings(), watch=args.watch)


def _port(text: str) -> int:
    """A TCP port for argparse, 0 (a free one) to 65535: a bad one is a usage error, not an OverflowError from bind."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _host(text: str) -> str:
    """An address or host name to listen on, for argparse. An empty one listened where `up` did not look: `up --host
    ''` waited out its start timeout for an API that `api` had put on LLAVA_QUEUE_HOST (its default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name an address (127.0.0.1, 0.0.0.0 for every one, ::) or a host name")
    return text


def _given(text: str) -> str:
    """A model path, Redis URL or folder for argparse: not empty. `up --model-path ''` served the default model,
    `--redis-url ''` started the embedded Redis, and `--redis-dir ''` kept its data in the current folder, each as if
    the option had not been given (a `$VAR` that was not set, unsaid)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: leave the option out for its default")
    return text


def _folder(text: str) -> Path:
    """A folder for argparse: not empty (`_given`)."""
    return Path(_given(text))


def _up_port(text: str) -> int:
    """`up`'s API port: not 0, since `up` waits for the API at its address and prints it, so it must know it."""
    port = _port(text)
    if port == 0:
        raise argparse.ArgumentTypeError("0: `up` waits for the API at its port and prints its address, so it needs "
                                         "a fixed one (1 to 65535); `llava-queue api --port 0` takes a free one")
    return port


def _seconds(text: str) -> float:
    """A positive number of seconds for argparse (a zero or negative timeout or interval makes no sense)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < math.inf:  # also NaN
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 seconds, and finite")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The command line parser of `llava-queue` (built without running anything)."""
    parser = argparse.ArgumentParser(prog="llava-queue", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run Redis (embedded), a worker and the API")
    up.add_argument("--host", type=_host, help="where the API listens (default: LLAVA_QUEUE_HOST, 127.0.0.1)")
    up.add_argument("--port", type=_up_port, help="the API's port, 1 to 65535 (default: LLAVA_QUEUE_PORT, 8000)")
    up.add_argument("--model-path", type=_given, help="model to serve (default: the embedded SmolLM2-135M-Instruct)")
    up.add_argument("--redis-url", type=_given, help="use this Redis instead of starting an embedded one")
    up.add_argument("--redis-port", type=_port, default=None, help="port of the embedded Redis (default: a free one)")
    up.add_argument("--redis-dir", type=_folder, default=None,
                    help="folder of the embedded Redis's append-only file: queued and finished jobs survive a "
                         "restart (default: <cache dir>/redis)")
    up.add_argument("--ephemeral-redis", action="store_true", help="keep nothing after the embedded Redis stops")
    up.add_argument("--start-timeout", type=_seconds, default=600.0,
                    help="seconds to wait for the API and a ready worker before giving up (default: 600)")
    up.set_defaults(func=cmd_up)
    api = sub.add_parser("api", help="run the API against LLAVA_QUEUE_REDIS_URL")
    api.add_argument("--host", type=_host, help="an address or host name (default: LLAVA_QUEUE_HOST)")
    api.add_argument("--port", type=_port, help="0: a free port, which the log names (default: LLAVA_QUEUE_PORT)")
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run one worker against LLAVA_QUEUE_REDIS_URL",
                            description="One worker: it serves LLAVA_QUEUE_MODEL_PATH (default: the embedded "
                                        "SmolLM2-135M-Instruct) from LLAVA_QUEUE_REDIS_URL; it takes no options, "
                                        "every setting is an LLAVA_QUEUE_* variable (README, Settings).")
    worker.set_defaults(func=cmd_worker)
    status = sub.add_parser("status", help="show queues, workers and throughput (from LLAVA_QUEUE_REDIS_URL)")
    status.add_argument("--watch", nargs="?", type=_seconds, const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(func=cmd_status)
    add_eval_parser(sub)
    return parser


def settings_error(exc: Exception) -> str:
    """What is wrong with the LLAVA_QUEUE_* variables, one line per variable (a Redis password masked)."""
    from shared.status import without_password

    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            value = error.get("input")
            if field == "redis_url" and isinstance(value, str):
                value = without_password(value)
            message = error["msg"].removeprefix("Value error, ")
            if field == "api_key_hashes":
                # An entry that is no digest may be a key itself: its message says which entry, not its text.
                lines.append(f"LLAVA_QUEUE_{field.upper()}: {message}")
                continue
            # A check across fields (no field of its own) names its variables in its message.
            lines.append(f"LLAVA_QUEUE_{field.upper()}={value!r}: {message}" if field else message)
        return "bad setting: " + "; ".join(lines)
    found = re.search(r'field "(\w+)"', str(exc))
    if found:
        return (f"bad setting: LLAVA_QUEUE_{found.group(1).upper()} cannot be read ({exc.__cause__ or exc}); "
                "lists are JSON, e.g. '[\"a\", \"b\"]'")
    return f"bad setting: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except (ValidationError, SettingsError) as exc:
        print(f"llava-queue: {settings_error(exc)}", file=sys.stderr, flush=True)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    for line in unknown_variables(os.environ):
        if settings.log_format == "json":
            # A line a log collector reads, as every other line then (it was plain text among them); at WARNING, or
            # at the level set if that is higher, as printed it was always there.
            logger = logging.getLogger("llava_queue")
            logger.log(max(logging.WARNING, logger.getEffectiveLevel()), line)
        else:
            print(f"llava-queue: {line}", file=sys.stderr, flush=True)
    try:
        return args.func(args)
    except BrokenPipeError:
        # Its reader left (`llava-queue status | head`): no traceback; what is still buffered goes nowhere at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
