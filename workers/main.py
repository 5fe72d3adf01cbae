"""The worker process: load the model once, start the engine thread, then run Celery with a thread pool."""

import base64
import io
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time

import redis
import torch
from celery import signals
from kombu.exceptions import OperationalError
from PIL import Image
from redis.exceptions import RedisError, ResponseError

from shared.celery_app import (BATCH_QUEUE, INTERACTIVE_QUEUE, QueueScan, budget_queue, celery_app, redis_warnings,
                               remove_stale_messages, resend_lost_tasks, restore_messages_of_gone_workers,
                               send_first, send_many, task_queue, worker_queues)
from shared.cpus import keep_process_to, split_cpus
from shared.heap import freeze_startup_heap
from shared.jobs import Claim, DamagedRecord, JobStore, WorkerRegistry, answers_later, wrong_type
from shared.logs import bind_job_ids_to_celery_tasks, celery_worker_arguments
from shared.protocol import IMAGE_TOKEN, GenerateRequest, set_max_new_tokens_cap
from shared.settings import Settings
from shared.status import without_password
from workers import tasks
from workers.batch_slots import BatchSlots, consumer_step
from workers.builder import LoadedModel, ModelLoadError, load_model, serving_engine
from workers.default_model import ensure_default_model
from workers.engine import LLMEngine, SamplingParams
from workers.generation import HAND_BACK_REQUEUE_SECONDS, JobRunner, prepare, writes_behind
from workers.metrics import METRICS, serve
from workers.pool import HandingBackPool
from workers.torch_threads import in_passing_thread

log = logging.getLogger("llava_queue.worker")


def run_worker(settings: Settings) -> None:
    """Serve jobs from Redis until the process is told to stop."""
    bind_job_ids_to_celery_tasks()
    set_max_new_tokens_cap(settings.max_new_tokens_cap)
    _check_redis(settings)
    # Dedicated engine cores: every thread but the engine's keeps to the others (the engine thread moves itself).
    split = split_cpus(settings.engine_cpus)
    keep_process_to(split.rest)
    if settings.worker_metrics_port:
        # Up before the model loads: /readyz says 503 until the warm-up is done.
        exporter = serve(METRICS, settings.worker_metrics_host, settings.worker_metrics_port)
        log.info("metrics on http://%s:%d/metrics", settings.worker_metrics_host, exporter.server_port)
    load_started = time.monotonic()
    # Torch runs here only on threads that end (workers/torch_threads.py): the engine thread's team stays the only one.
    loaded = in_passing_thread(_load, settings)
    load_seconds = time.monotonic() - load_started
    # The hand-back bound is the settings' (LLAVA_QUEUE_MAX_HAND_BACKS): the worker's start is where it is applied.
    store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.job_ttl_seconds,
                              max_hand_backs=settings.max_hand_backs)
    # A name of this process alone: a container restarted after a crash has the same host name and, as pid 1, the
    # same pid, and a restarted worker taken for the dead one left its jobs running for ever (JobStore.start).
    name = f"{loaded.name}@{socket.gethostname()}/{secrets.token_hex(3)}:{os.getpid()}"
    behind = writes_behind(loaded.device, split.engine, split.rest)
    runner = JobRunner(store, loaded, name, settings.max_new_tokens_cap, settings.max_attempts,
                       settings.stream_interval, behind,
                       hand_over=lambda job_id, queue, budget: send_many(
                           celery_app, [(job_id, budget_queue(queue, loaded.name, budget))], store.clock))
    log.info("engine steps written to Redis %s", "on a thread of their own, while the engine goes on" if behind
             else "by the engine thread (a CPU engine on every core)")
    # R = 0 slots kept included: the batch queues are paused while a job waits in the engine for room, as well as at
    # MAX_NUM_SEQS - R batch jobs.
    batch_slots = BatchSlots(settings.max_num_seqs - settings.reserved_slots,
                             (budget_queue(BATCH_QUEUE, loaded.name, settings.max_batch_tokens),
                              task_queue(BATCH_QUEUE, loaded.name), BATCH_QUEUE))

    def on_step(outputs):
        try:
            runner.publish(outputs)
        finally:
            # After a write that failed too (the engine logs it). Read on the engine's thread. A request that came
            # during a decode step waits for the next one, room or not: counted, the batch queues were paused and
            # read again at every step of a burst.
            batch_slots.engine_waits(engine.scheduler.next_waits_for_room())

    engine = in_passing_thread(serving_engine, loaded, settings, on_step=on_step, cpus=split.engine or None)
    runner.attach(engine)
    warmup_seconds = in_passing_thread(_warm_up, engine, loaded)
    log.info("model %s loaded in %.1f s, warmed up in %.2f s", loaded.name, load_seconds, warmup_seconds)
    METRICS.observe_load(loaded.name, load_seconds, warmup_seconds)
    METRICS.bind(loaded.name, engine)
    METRICS.start_observer(store, name, settings.conversation_log)
    info = {"name": name, "model": loaded.name, "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "max_num_seqs": settings.max_num_seqs,
            "started_at": store.clock(), "load_seconds": round(load_seconds, 2), "ready": True}
    engine_stopped = threading.Event()
    engine.on_stop = lambda error: _stop_worker(error, runner, store, info, engine_stopped)
    engine.start()
    celery_app.steps["consumer"].add(consumer_step(batch_slots))
    signals.task_received.connect(lambda request, **_: batch_slots.received(request), weak=False)
    signals.task_postrun.connect(lambda task_id, **_: batch_slots.ended(task_id), weak=False)
    signals.task_revoked.connect(lambda request, **_: batch_slots.dropped(request.id), weak=False)
    tasks.install(runner)
    frozen = freeze_startup_heap()
    threads = len(engine.cpus) if engine.cpus else torch.get_num_threads()
    where = f" ({split.describe()})" if split.engine else ""
    log.info("worker %s: model %s, device %s, dtype %s, %d torch threads%s, max_num_seqs %d, max_batch_tokens %d, "
             "max_prefill_tokens %d, stream_interval %d; %d start-up objects frozen out of full garbage collections",
             name, loaded.name, loaded.device, loaded.precision, threads, where,
             settings.max_num_seqs, settings.max_batch_tokens, engine.scheduler.max_prefill_tokens,
             settings.stream_interval, frozen)
    registry = WorkerRegistry(store.redis, settings.key_prefix)
    # Each message this worker takes is recorded as held by its registry key: once the key has lapsed (the worker
    # died), the orphan sweep puts back the messages whose jobs it had not started, not kombu 4 hours later.
    celery_app.conf.broker_transport_options = {**celery_app.conf.broker_transport_options,
                                                "message_holder": registry.key(name)}
    celery_app.conf.worker_consumer = "workers.consumer:Consumer"
    stop = threading.Event()
    METRICS.set_ready(True)
    threading.Thread(target=_follow_cancellations, args=(store, runner, stop), daemon=True,
                     name="cancellations").start()
    threading.Thread(target=_announce, args=(registry, info, engine, settings, stop), daemon=True,
                     name="announce").start()
    threading.Thread(target=_sweep_orphans, args=(store, settings, stop), daemon=True, name="sweeper").start()

    hand_backs: list[threading.Thread] = []

    def on_shutdown(**_):
        # Not ready any more (the next heartbeat says so); Celery stops taking jobs and waits for the
        # running ones; past the grace period, hand them back.
        info["ready"] = False
        METRICS.set_ready(False)
        def hand_back_later():
            if not engine_idle.wait(settings.shutdown_grace_seconds):
                hand_back_running("shutting down")
        thread = threading.Thread(target=hand_back_later, daemon=True, name="hand-back")
        hand_backs.append(thread)
        thread.start()

    def hand_back_running(when: str) -> None:
        handed = runner.hand_back(lambda job_id: _deliver_again(store, job_id))
        if handed:
            log.warning("%s: handed %d running jobs back to the queue", when, len(handed))

    def hand_back_at_once():
        hand_back_running("shutting down at once")

    HandingBackPool.hand_back_all = hand_back_at_once  # a cold shutdown's (a second Ctrl-C, SIGQUIT)

    def on_revoked(request=None, terminated=False, **_):
        # A job's task id is its job id. Revoked with terminate, a running job is cancelled here (workers.pool.
        # JobRequest); revoked before it ran, its message is discarded, and its record, left queued, would have its
        # message sent again by the sweep and discarded, for as long as the worker remembers the revoke (3 hours).
        job_id = getattr(request, "id", None)
        if not isinstance(job_id, str):
            return
        try:
            status = store.cancel(job_id)
        except RedisError as exc:
            log.warning("job %s revoked through Celery, but not cancelled (Redis: %s)", job_id, exc)
            return
        log.info("job %s revoked through Celery (%s): cancelled (it was %s)", job_id,
                 "terminated" if terminated else "its message discarded", status)

    signals.task_revoked.connect(on_revoked, weak=False)
    engine_idle = threading.Event()
    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(lambda **_: engine_idle.set(), weak=False)
    try:
        # One task thread per engine slot: Celery never reserves more jobs than the engine can batch. (Celery's
        # command line takes a pool's alias only; its setting takes the class, read when the pool is the default.)
        celery_app.conf.worker_pool = f"{HandingBackPool.__module__}:{HandingBackPool.__name__}"
        celery_app.worker_main([*celery_worker_arguments(settings.log_format),
                                "worker", f"--concurrency={settings.max_num_seqs}",
                                "-Q", ",".join(worker_queues(loaded.name, settings.max_batch_tokens)),
                                "-n", celery_node_name(name),
                                f"--loglevel={settings.log_level}",
                                "--without-gossip", "--without-mingle"])
    finally:
        stop.set()
        for thread in hand_backs:
            # The hand-back aborts a job before it sends it again and logs it: the abort ends the job's task, and
            # with the last task Celery returns here. Exiting then (the thread is a daemon) could drop the job's new
            # delivery (the orphan sweep sent it a minute later) and the log line.
            thread.join(HAND_BACK_JOIN_SECONDS)
        # Celery may return with jobs still in the engine (a cold shutdown its pool did not see through): they are
        # handed back, not ended failed ("engine shut down") by the engine's shutdown below.
        hand_back_at_once()
        try:
            registry.remove(name)
        except RedisError as exc:
            log.warning("worker %s not removed from the registry (Redis: %s): its entry expires within %d s", name,
                        exc, settings.heartbeat_ttl_seconds)
        engine.shutdown()
    if engine_stopped.is_set():
        # Not a stop that was asked for: the supervisor (Compose's restart policy, systemd) starts a new worker.
        raise SystemExit(ENGINE_STOPPED_EXIT_STATUS)


def _check_redis(settings: Settings) -> None:
    """Log what about Redis would lose or refuse jobs (`redis_warnings`); what refuses the worker for good is
    checked by `llava-queue worker` before it gets here (shared/cli.py)."""
    try:
        with redis.Redis.from_url(settings.redis_url, socket_timeout=5) as client:
            warnings = redis_warnings(client)
    except RedisError as exc:
        log.warning("Redis at %s does not answer yet (%s); the worker waits for it",
                    without_password(settings.redis_url), exc)
        return
    for warning in warnings:
        log.warning("Redis at %s: %s", without_password(settings.redis_url), warning)


def celery_node_name(name: str) -> str:
    """The `-n` option that makes Celery's node name `name` as it is: Celery expands `%` codes in it (%h, %n, %i...),
    so a model name holding a `%` (`a%b`) stopped the worker at start with "ValueError: Unknown format %b", and one
    holding a known code (`a%h`) gave a node name other than the worker's. `%%` is Celery's `%`."""
    return name.replace("%", "%%")


# The exit status of a worker whose engine stopped itself (EX_SOFTWARE).
ENGINE_STOPPED_EXIT_STATUS = 70


def _stop_worker(error: str, runner: JobRunner, store: JobStore, info: dict, engine_stopped: threading.Event,
                 terminate=lambda: os.kill(os.getpid(), signal.SIGTERM)) -> None:
    """The engine's on_stop hook: the engine stopped itself and will fail every job it holds or is given.

    It stayed "ready" and went on taking jobs only to fail them. Now its jobs are handed back instead (the runner),
    the worker says it is not ready (the next heartbeat, /readyz), and it stops as on SIGTERM (Celery takes no more
    jobs and lets the running tasks end, the hand-back as at shutdown), then exits with a status that says it failed."""
    log.critical("worker %s: %s; handing its jobs back and exiting", info["name"], error)
    runner.engine_stopped(error, lambda job_id: _deliver_again(store, job_id))
    info["ready"] = False
    METRICS.set_ready(False)
    engine_stopped.set()
    terminate()


# How long an exiting worker waits for its hand-back to send the jobs again (each release a Redis write, tried twice;
# their requeues tried for up to HAND_BACK_REQUEUE_SECONDS in all).
HAND_BACK_JOIN_SECONDS = HAND_BACK_REQUEUE_SECONDS + 5.0


def _deliver_again(store: JobStore, job_id: str) -> None:
    """Send a started job's task again, to the head of its queue for the model it started on (the text it has came
    from that model, so a worker serving another one must not go on with it): it goes on before the jobs queued
    since it started (`send_first`). A job whose record is damaged is not sent (`_fields`)."""
    fields = _fields(store, job_id, "queue", "model")
    if fields is not None:
        send_first(celery_app, job_id, task_queue(fields[0] or INTERACTIVE_QUEUE, fields[1]))


def _fields(store: JobStore, job_id: str, *names: str) -> list | None:
    """The fields `names` of a job's record; None, logged, where its key holds another type than a hash (a key SET by
    hand), in which no job can run. Its WRONGTYPE, raised, failed the orphan sweep's rounds as an outage, with the
    claims of other jobs, or was tried again for a hand-back's whole wait."""
    try:
        return store.redis.hmget(store.key(job_id), names)
    except ResponseError as exc:
        if not wrong_type(exc):
            raise
    log.warning("%s; it is not delivered again", DamagedRecord(job_id, store.redis.type(store.key(job_id))).message)
    return None


class _RedisOutage:
    """A background loop's loss of Redis, logged once when it starts and once when it ends, not at every try."""

    def __init__(self, loop: str):
        self.loop = loop
        self.lost = False

    def failed(self, exc: Exception) -> None:
        if not self.lost:
            log.warning("%s lost Redis (%s); trying again until it answers", self.loop, exc)
            self.lost = True

    def reached(self) -> None:
        if self.lost:
            log.info("%s: Redis is back", self.loop)
            self.lost = False


def _follow_cancellations(store: JobStore, runner: JobRunner, stop: threading.Event) -> None:
    """Abort a running job in this worker's batch when its cancellation is broadcast.

    While Redis is away it tries again every second (a cancellation missed meanwhile is still caught at the
    job's next chunk).
    """
    outage = _RedisOutage("cancellation listener")
    while not stop.is_set():
        try:
            pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(store.control_channel)
            outage.reached()
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message:
                    runner.cancel(message["data"])
        except RedisError as exc:
            outage.failed(exc)
            time.sleep(1.0)
        except Exception:
            log.exception("cancellation listener failed; starting it again")
            time.sleep(1.0)


def _load(settings: Settings) -> LoadedModel:
    """The model the settings name (the default model, fetched and converted on first use, when none is named)."""
    try:
        model_path = settings.model_path or str(ensure_default_model(settings.cache_dir))
    except OSError as exc:  # a cache folder that is a file, or that cannot be written
        raise ModelLoadError(f"cannot build the default model in LLAVA_QUEUE_CACHE_DIR={str(settings.cache_dir)!r}: "
                             f"{exc}") from exc
    return load_model(model_path, settings.model_base, settings.model_name, device=settings.device,
                      dtype=settings.dtype, load_8bit=settings.load_8bit, load_4bit=settings.load_4bit,
                      vision_tower=settings.vision_tower)


def _warm_up(engine: LLMEngine, loaded: LoadedModel) -> float:
    """Run one greedy 1-token request through the engine before it starts (first kernels, allocator), and for a
    vision model one with an image too, through `prepare` as a job's (image decoding, the vision tower, a prefill
    from embeddings); returns the seconds it took.

    The engine is stepped by the calling thread, with its step hook off, so nothing reaches Redis.
    A failed warm-up is logged; the worker still serves (the error would show on the first job).
    """
    started = time.monotonic()
    on_step, engine.on_step = engine.on_step, None
    try:
        # The tokenizer's first call makes its thread pool, on this thread's CPUs: the rest, not the engine's.
        ids = loaded.tokenizer("Hello", add_special_tokens=True).input_ids
        engine.use_this_thread()  # an OpenMP team as the engine thread's will be: on the engine's cores, as many
        one_token = SamplingParams(temperature=0.0, max_new_tokens=1)
        handles = [engine.add_request("warm-up", ids, one_token)]
        if loaded.vision is not None:
            request = GenerateRequest(prompt=f"{IMAGE_TOKEN}\nHello", images=[_warm_up_image()], temperature=0.0,
                                      max_new_tokens=1)
            prepared = prepare(request, loaded, max_new_tokens_cap=1)
            handles.append(engine.add_request("warm-up-image", prepared.text_token_ids, prepared.params,
                                              prompt_embeds=prepared.engine_prompt_embeds()))
        for _ in range(100):
            if all(handle.done.is_set() for handle in handles):
                break
            engine.step()
        for handle in handles:
            output = handle.wait(timeout=0)
            if output.error:
                log.warning("warm-up request %s failed: %s", output.request_id, output.error)
    except Exception:
        log.exception("warm-up request failed")
    finally:
        engine.on_step = on_step
    return time.monotonic() - started


def _warm_up_image() -> str:
    """A small gray PNG, base64: the vision warm-up's image."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _announce(registry: WorkerRegistry, info: dict, engine: LLMEngine, settings: Settings,
              stop: threading.Event) -> None:
    """Refresh this worker's heartbeat, with the engine's current load and tokens/s; silence means this worker died."""
    last_at, last_tokens = time.monotonic(), engine.stats()["generated_tokens"]
    outage = _RedisOutage("the heartbeat")
    while not stop.is_set():
        stats, now = engine.stats(), time.monotonic()
        tokens_per_second = (stats["generated_tokens"] - last_tokens) / max(now - last_at, 1e-3)
        last_at, last_tokens = now, stats["generated_tokens"]
        try:
            registry.announce(info["name"], {**info, **stats, "tokens_per_second": round(tokens_per_second, 1),
                                             "heartbeat_at": registry.clock()},
                              ttl_seconds=settings.heartbeat_ttl_seconds)
            outage.reached()
            METRICS.set_reaching_redis(True)
        except RedisError as exc:
            outage.failed(exc)
            METRICS.set_reaching_redis(False)
        except Exception:
            log.exception("could not announce the worker")
        stop.wait(settings.heartbeat_interval_seconds)


def _sweep_orphans(store: JobStore, settings: Settings, stop: threading.Event, requeue_after: float = 60.0) -> None:
    """Deliver again the jobs of workers that died, so none stays `running` forever, and put back on their queues the
    messages they had taken and not acknowledged, so a job taken but not started does not wait out the visibility
    timeout (4 h) `queued`; send again the tasks of jobs queued with their message nowhere (`resend_lost_tasks`); and
    remove the task messages of ended jobs from the queues no live worker reads (`remove_stale_messages`).

    Every worker sweeps; a short lock makes one sweep at a time. A job delivered twice is
    harmless: `JobStore.start` lets only one live worker hold it.

    A heartbeat missing just after Redis was away says nothing: every worker's lapsed during the
    outage (or vanished with a restarted Redis), and the live ones have not announced themselves
    again yet. So no worker is judged dead until Redis has been reachable, and up, for a whole
    heartbeat_ttl_seconds plus one interval since this sweep last failed: before, the first sweep
    after an outage longer than the TTL delivered running jobs of live workers again, and another
    worker could resume one that a live worker still ran (fenced off, but run twice, an attempt spent).

    A claim this sweep made but did not deliver (the claim's answer lost twice, or the delivery failed) is made
    again and delivered at its next rounds, once Redis answers: the job stayed claimed, delivered by nobody, until
    its claim lapsed (`requeue_after`, a minute). Only the same claim is made again, which answers True only while
    the job is still marked by it, so no other sweep delivers the job meanwhile and a job started since is left alone.
    """
    wait = settings.heartbeat_ttl_seconds + settings.heartbeat_interval_seconds
    judge_after = 0.0
    outage = _RedisOutage("the orphan sweep")
    refusals: set[str] = set()
    undelivered: dict[str, Claim] = {}
    queue_scan = QueueScan()
    while not stop.wait(settings.heartbeat_interval_seconds):
        try:
            _deliver_claimed(store, undelivered, requeue_after)
            swept = store.redis.set(f"{settings.key_prefix}:sweeping", "1", nx=True,
                                    ex=max(1, int(settings.heartbeat_interval_seconds)))
            outage.reached()
            if not swept:
                continue
            for job_id in store.expire_overdue():
                log.info("job %s expired: waiting in a queue past its deadline", job_id)
            if time.monotonic() < judge_after or _redis_uptime(store, refusals) < wait:
                continue
            for claim in store.orphans(requeue_after):
                undelivered.setdefault(claim.job_id, claim)
            _deliver_claimed(store, undelivered, requeue_after)
            for tag in restore_messages_of_gone_workers(celery_app):
                log.warning("message %s: the worker that took it stopped beating before acknowledging it; back on its "
                            "queue", tag)
            for job_id in resend_lost_tasks(celery_app, store, settings.resend_after_seconds):
                log.warning("job %s: queued %g s or more with its task message nowhere; sent again", job_id,
                            settings.resend_after_seconds)
            removed = remove_stale_messages(celery_app, store, queue_scan)
            if removed:
                log.info("task messages of jobs that ended removed from queues no worker reads: %d", len(removed))
        except (RedisError, OperationalError) as exc:  # kombu's OperationalError: a delivery that found no broker
            judge_after = time.monotonic() + wait
            outage.failed(exc)
        except Exception:
            log.exception("the orphan sweep failed; trying again")


def _redis_uptime(store: JobStore, refusals: set[str]) -> float:
    """Seconds since Redis started (INFO); infinite when Redis refuses INFO for good (an ACL user without @dangerous,
    the category INFO is in, or a server without the command), logged once per reason in `refusals`: the sweep then
    judges only by the outages it saw itself. The refusal raised at every round, taken for an outage, and the jobs of
    a dead worker stayed `running` for good."""
    try:
        return store.redis.info("server")["uptime_in_seconds"]
    except ResponseError as exc:
        if answers_later(exc):
            raise
        if str(exc) not in refusals:
            refusals.add(str(exc))
            log.warning("the orphan sweep cannot read Redis's uptime (%s: %s): a Redis restarted since its last sweep "
                        "is not waited out", type(exc).__name__, exc)
        return math.inf


def _deliver_claimed(store: JobStore, claims: dict[str, Claim], requeue_after: float) -> None:
    """Make each claim (again) and deliver its job; a claim leaves `claims` once delivered, or found not (or no
    longer) this sweep's to deliver. One that raises stays, with those after it, for the next round.

    A claim older than half `requeue_after` is dropped undelivered: other sweeps may claim its job soon (it has
    lapsed at `requeue_after`), and this one must not deliver it with them; `orphans` lists the job again."""
    for job_id, claim in list(claims.items()):
        if store.clock() - claim.at > requeue_after / 2:  # a claim's time is on the store's clock
            del claims[job_id]
            continue
        # A claim made again answers as it did, even where the job's record was damaged since (`_fields`).
        if store.claim(claim) and (fields := _fields(store, job_id, "cancel_requested")) is not None:
            if fields[0] == "1":
                # Cancelled while its worker was dead (or dying): the cancel left it to that worker, and delivered
                # again it waited for a worker of its model to start it, and end it; where none came, for its whole
                # wait again (a batch's line: the batch's window, its batch "cancelling" for as long). Claimed, no
                # worker holds it: the cancel ends it now.
                store.cancel(job_id)
                log.info("job %s: its worker stopped beating, and it was cancelled: ended", job_id)
            else:
                log.warning("job %s: its worker stopped beating; delivering it again", job_id)
                _deliver_again(store, job_id)
        del claims[job_id]
