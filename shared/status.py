"""`llava-queue status`: queues, workers and recent throughput as a table, read straight from Redis.

    $ llava-queue status
    llava-queue status  redis://127.0.0.1:6379/0  2026-11-25 12:22:17
    QUEUE        QUEUED
    interactive       0
    batch             0
    running 7 · submitted 7 · finished 0

    WORKER                          MODEL                  DEVICE  READY  SLOTS  WAITING  KV BUDGET     TOK/S  HEARTBEAT
    SmolLM2-135M-Instruct@vm:27278  SmolLM2-135M-Instruct  cpu     yes     7/32        0  677/16.4k 4%    9.6  1.8 s ago

    throughput: 9.6 tokens/s (1 worker) · 0.00 jobs/s finished over the last minute

`--watch [SECONDS]` redraws it every SECONDS (2 by default) until Ctrl-C.
"""

import re
import sys
import time
import unicodedata
from collections import Counter

import redis

from shared.jobs import QUEUES, JobStore, WorkerRegistry
from shared.settings import Settings

_CLEAR = "\033[H\033[2J"


def render_status(store: JobStore, registry: WorkerRegistry, redis_url: str) -> str:
    """The status table as text (raises redis.RedisError when Redis does not answer). Jobs past their deadline are
    ended first, as the API does before it counts the queues, so they are not shown waiting; on a read-only replica,
    which cannot end them (the primary's API does), they are counted as they are. Heartbeats' ages are read on
    Redis's clock, on which the workers write them."""
    now = registry.clock()
    try:
        store.expire_overdue()
    except redis.ReadOnlyError:
        pass
    totals = store.totals()
    workers = registry.workers()
    jobs_per_second = store.finished_per_second()
    lines = [f"llava-queue status  {without_password(redis_url)}  {time.strftime('%Y-%m-%d %H:%M:%S')}".rstrip()]
    lines += _table(["QUEUE", "QUEUED"], [[queue, totals["queued"].get(queue, 0)] for queue in QUEUES],
                    right={1})
    by_status = Counter()
    for (status, _code), count in totals["finished"].items():
        by_status[status] += count
    finished = sum(by_status.values())
    detail = ", ".join(f"{status} {count}" for status, count in by_status.most_common())
    requeued = f" ({totals['requeued']} back in a queue, no worker running them)" if totals["requeued"] else ""
    lines.append(f"running {totals['running']}{requeued} · submitted {sum(totals['submitted'].values())} · "
                 f"finished {finished}" + (f" ({detail})" if detail else ""))
    if totals["requeued"]:
        # Per model: the one whose workers are gone (or never came) is the one to start a worker for.
        per_model = sorted(totals["requeued_per_model"].items(), key=lambda item: (-item[1], item[0]))
        lines.append("back in a queue: " + " · ".join(f"{model or '(no model yet)'} {count}"
                                                      for model, count in per_model))
    lines.append("")
    rows = []
    for worker in sorted(workers, key=lambda w: (w.get("model", ""), w.get("name", ""))):
        heartbeat = worker.get("heartbeat_at")
        rows.append([
            worker.get("name", "?"), worker.get("model", "?"), worker.get("device", "?"),
            "yes" if worker.get("ready", True) else "no",
            f"{worker.get('num_running', 0)}/{worker.get('max_num_seqs', '?')}",
            worker.get("num_waiting", 0),
            _budget(worker.get("reserved_tokens", 0), worker.get("max_batch_tokens", 0)),
            f"{worker.get('tokens_per_second', 0.0):.1f}",
            f"{max(0.0, now - heartbeat):.1f} s ago" if heartbeat else "?",
        ])
    if rows:
        lines += _table(["WORKER", "MODEL", "DEVICE", "READY", "SLOTS", "WAITING", "KV BUDGET", "TOK/S",
                         "HEARTBEAT"], rows, right={4, 5, 7})
    else:
        lines.append("no live worker")
    tokens_per_second = sum(worker.get("tokens_per_second", 0.0) for worker in workers)
    lines.append("")
    lines.append(f"throughput: {tokens_per_second:.1f} tokens/s ({len(workers)} worker"
                 f"{'' if len(workers) == 1 else 's'}) · {jobs_per_second:.2f} jobs/s finished over the last minute")
    return "\n".join(lines)


def run_status(settings: Settings, watch: float | None = None) -> int:
    """Print the table once (exit status 1 if Redis does not answer), or redraw it every `watch` seconds."""
    store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.job_ttl_seconds)
    registry = WorkerRegistry(store.redis, settings.key_prefix)
    if watch is None:
        try:
            print(render_status(store, registry, settings.redis_url))
        except redis.RedisError as exc:
            print(f"llava-queue status: Redis at {without_password(settings.redis_url)} does not answer: {exc}",
                  file=sys.stderr)
            return 1
        return 0
    try:
        while True:
            try:
                text = render_status(store, registry, settings.redis_url)
            except redis.RedisError as exc:
                text = f"Redis at {without_password(settings.redis_url)} does not answer: {exc}"
            print(_CLEAR + text, flush=True)
            time.sleep(max(0.2, watch))
    except KeyboardInterrupt:
        return 0


def _table(header: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    """The rows under the header in aligned columns, padded by the width each cell takes on a terminal: a model
    named in CJK characters (two columns each) pushed every column after it out of line, padded by len()."""
    cells = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(_columns(row[column]) for row in cells) for column in range(len(header))]
    return ["  ".join(_pad(cell, width, column in right)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in cells]


def _columns(text: str) -> int:
    """Terminal columns `text` takes: two for an East Asian wide or fullwidth character, none for a combining mark."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def _pad(cell: str, width: int, right: bool) -> str:
    padding = " " * (width - _columns(cell))
    return padding + cell if right else cell + padding


def _budget(used: int, total: int) -> str:
    if not total:
        return str(used)
    return f"{_short(used)}/{_short(total)} {100 * used / total:.0f}%"


def _short(number: int) -> str:
    return f"{number / 1000:.1f}k".replace(".0k", "k") if number >= 1000 else str(number)


def without_password(url: str) -> str:
    """The Redis URL with any password masked, fit to print: in its user part, or in its query (`?password=`,
    which redis-py reads too, the documented form for a unix socket)."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)
    scheme, sep, rest = url.partition("://")
    if not sep:  # a malformed URL (no "://"): its user part is still masked
        scheme, rest = "", url
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"
