"""The `llava-queue` command: `up` runs the whole stack; `api` and `worker` run one piece each;
`status` shows queues and workers; `eval` answers an original question file through the queue."""

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.cpus import keep_to, split_cpus
from shared.eval_cli import add_eval_parser
from shared.logs import setup_logging
from shared.redis_server import RedisServer
from shared.settings import get_settings

log = logging.getLogger("llava_queue")


def _die_with_parent() -> None:
    # Children get SIGTERM if `up` itself dies, even by SIGKILL: none is left behind.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child_setup(cpus: frozenset[int] = frozenset()):
    """A child's preexec_fn: it dies with `up`, and runs on `cpus` (all of the parent's when empty)."""
    def setup() -> None:
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


def _wait_ready(url: str, children: list[subprocess.Popen], timeout: float) -> bool:
    """Wait until the API answers and a worker has announced itself; False if a child died."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            return False
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if json.load(response).get("workers"):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded Redis (unless --redis-url), one worker, the API; Ctrl-C stops them all."""
    env = dict(os.environ)
    redis_server = None
    try:
        split = split_cpus(get_settings().engine_cpus)
    except ValueError as exc:
        print(f"llava-queue: {exc}", file=sys.stderr, flush=True)
        return 2
    # With engine cores, Redis and the API keep off them (the worker moves its own other threads off them).
    rest = split.rest
    if args.redis_url:
        env["LLAVA_QUEUE_REDIS_URL"] = args.redis_url
    else:
        data_dir = None if args.ephemeral_redis else (args.redis_dir or get_settings().cache_dir / "redis")
        try:
            redis_server = RedisServer(port=args.redis_port, data_dir=data_dir).start(
                preexec_fn=_child_setup(rest), start_new_session=True)
        except RuntimeError as exc:
            print(f"llava-queue: cannot start the embedded Redis: {exc}", file=sys.stderr, flush=True)
            return 2
        env["LLAVA_QUEUE_REDIS_URL"] = redis_server.url
        kept = f", jobs kept in {data_dir}" if data_dir else ", nothing kept after it stops"
        print(f"llava-queue: embedded Redis ({os.path.basename(redis_server.binary)}) at {redis_server.url}{kept}",
              flush=True)
    if args.model_path:
        env["LLAVA_QUEUE_MODEL_PATH"] = args.model_path
    children: list[subprocess.Popen] = []
    stopping = hurry = False

    def on_signal(signum, _frame):
        # The first signal stops the stack in order; a second one while it stops kills what is left.
        nonlocal stopping, hurry
        hurry = stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        children.append(_spawn(["worker"], env))
        children.append(_spawn(["api", "--host", args.host, "--port", str(args.port)], env, rest))
        url = f"http://{args.host}:{args.port}"
        print("llava-queue: starting the worker (the first start fetches and converts the default model)...",
              flush=True)
        if _wait_ready(url, children, timeout=args.start_timeout):
            print(f"llava-queue is up: API {url}  (docs {url}/docs, health {url}/healthz). Ctrl-C stops it.",
                  flush=True)
        elif not stopping:
            print("llava-queue: a process failed to start; stopping", file=sys.stderr, flush=True)
            return 1
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
        return 0 if stopping else 1
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

    from api.main import GRACEFUL_SHUTDOWN_SECONDS, ApiServer, app
    from shared.heap import freeze_startup_heap

    settings = get_settings()
    # The app is built (FastAPI, pydantic, every route): keep all of that out of full collections.
    logging.getLogger("llava_queue.api").info("%d start-up objects frozen out of full garbage collections",
                                              freeze_startup_heap())
    config = uvicorn.Config(app, host=args.host or settings.host, port=args.port or settings.port,
                            log_level="info", log_config=None, ws_ping_interval=20,
                            ws_per_message_deflate=settings.ws_compression,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    ApiServer(config).run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker alone, against LLAVA_QUEUE_REDIS_URL."""
    from workers.builder import ModelLoadError
    from workers.main import run_worker

    try:
        split_cpus(get_settings().engine_cpus)
    except ValueError as exc:
        print(f"llava-queue worker: {exc}", file=sys.stderr)
        return 2
    try:
        run_worker(get_settings())
    except ModelLoadError as exc:
        print(f"llava-queue worker: cannot serve the model: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The queues and workers as a table, read from Redis; again every --watch seconds."""
    from shared.status import run_status

    return run_status(get_settings(), watch=args.watch)


def build_parser() -> argparse.ArgumentParser:
    """The command line parser of `llava-queue` (built without running anything)."""
    parser = argparse.ArgumentParser(prog="llava-queue", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run Redis (embedded), a worker and the API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model-path", help="model to serve (default: the embedded SmolLM2-135M-Instruct)")
    up.add_argument("--redis-url", help="use this Redis instead of starting an embedded one")
    up.add_argument("--redis-port", type=int, default=None, help="port of the embedded Redis (default: a free one)")
    up.add_argument("--redis-dir", type=Path, default=None,
                    help="folder of the embedded Redis's append-only file: queued and finished jobs survive a "
                         "restart (default: <cache dir>/redis)")
    up.add_argument("--ephemeral-redis", action="store_true", help="keep nothing after the embedded Redis stops")
    up.add_argument("--start-timeout", type=float, default=600.0)
    up.set_defaults(func=cmd_up)
    api = sub.add_parser("api", help="run the API against LLAVA_QUEUE_REDIS_URL")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run one worker against LLAVA_QUEUE_REDIS_URL")
    worker.set_defaults(func=cmd_worker)
    status = sub.add_parser("status", help="show queues, workers and throughput (from LLAVA_QUEUE_REDIS_URL)")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(func=cmd_status)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    setup_logging(settings.log_format, settings.log_level)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
