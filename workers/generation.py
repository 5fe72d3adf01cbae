"""From a job record to engine requests and back: what the Celery task runs, testable without Celery.

`prepare` turns a validated request into prompt text, token ids and sampling parameters (the
template, the stop string, the original's context guard). `JobRunner` moves a job through its
states and publishes every engine step's chunks in one pipelined round trip.
"""

import functools
import itertools
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from jinja2 import TemplateError, TemplateSyntaxError
from redis.exceptions import RedisError

from shared.conversation import choose_template, render_messages
from shared.jobs import (CANCELLED_ERROR, DAMAGED_ERROR, DAMAGED_STATUS_ERROR, QUEUES, RECORD_DAMAGED, RECORD_GONE,
                         DamagedRecord, Ending, JobStore, WorkerRegistry, answers_later)
from shared.protocol import CONTEXT_OVERFLOW_MSG, EXHAUSTED_ERROR, MAX_RENDERED_CHARS, ErrorCode, GenerateRequest
from workers.builder import LoadedModel
from workers.engine import LLMEngine, SamplingParams, SeqOutput
from workers.engine.decode_graphs import OTHER_CUDA_WORK
from workers.llava import embed_prompt, extend_prompt_embeds
from workers.metrics import METRICS
from workers.step_writer import StepWriter
from workers.torch_threads import in_passing_thread

log = logging.getLogger("llava_queue.worker")

T = TypeVar("T")

# How long a write of the worker waits for Redis to come back before it gives up (see `when_redis_answers`).
REDIS_WAIT_SECONDS = 300.0

# How long a hand-back tries to send its jobs again (a stopping worker waits for it: workers/main.py).
HAND_BACK_REQUEUE_SECONDS = 10.0

# What a Redis away, not answering in time, or refusing commands for a while raises (a write that met one is tried
# again, `when_redis_answers`) is told from a permanent refusal by the job store's `answers_later`, which the API's
# writes use too.
redis_answers_later = answers_later

_FINAL_STATUS = {"stop": "succeeded", "length": "succeeded", "cancelled": "cancelled", "error": "failed"}

# How a job ends when `JobStore.start` (of `store`) finds it should not run. A job handed back too often names the
# store's own bound (Settings.max_hand_backs), not the default one.
_ENDED_BEFORE_START = {
    "cancel": lambda store, job_id: Ending(job_id, "cancelled", CANCELLED_ERROR, ErrorCode.CANCELLED, "cancelled"),
    "expired": lambda store, job_id: Ending(job_id, "expired", "the job waited in the queue past its deadline",
                                            ErrorCode.EXPIRED, "expired"),
    "exhausted": lambda store, job_id: Ending(job_id, "failed", EXHAUSTED_ERROR, ErrorCode.SERVER_ERROR, "error"),
    "handed_back": lambda store, job_id: Ending(job_id, "failed", store.handed_back_error, ErrorCode.SERVER_ERROR,
                                                "error"),
    "damaged": lambda store, job_id: Ending(job_id, "failed", DAMAGED_STATUS_ERROR, ErrorCode.SERVER_ERROR, "error"),
}


@dataclass
class Prepared:
    """A request ready for the engine. `max_new_tokens` < 1 means the prompt leaves no room.

    `token_ids` holds one entry per prompt position. With images, each image feature position
    holds the placeholder -200, and `prompt_embeds` [T, hidden] is what the model reads (text
    embedded, image features spliced in); `embed_tokens` embeds ids appended later (a resumed job).
    """

    prompt: str
    token_ids: list[int]
    params: SamplingParams
    prompt_embeds: torch.Tensor | None = None
    embed_tokens: torch.nn.Module | None = None

    @property
    def text_token_ids(self) -> list[int]:
        """The prompt's text ids, image positions left out (not read by the engine when it gets prompt_embeds)."""
        return [token for token in self.token_ids if token >= 0]

    def engine_prompt_embeds(self) -> torch.Tensor | None:
        """What the engine reads: `prompt_embeds` then any ids appended to `token_ids` since; None for text."""
        if self.prompt_embeds is None:
            return None
        with OTHER_CUDA_WORK:
            return extend_prompt_embeds(self.prompt_embeds, self.token_ids[len(self.prompt_embeds):], self.embed_tokens)


def render_prompt(request: GenerateRequest, loaded: LoadedModel) -> tuple[str, str | tuple[str, ...] | None]:
    """The prompt text and stop string(s) of a request.

    A rendered `prompt` is used as sent, with the request's `stop`. `messages` are rendered with
    the original template for LLaVA model names (and models without a chat template), else with
    the tokenizer's chat template, whose end-of-turn token is then the stop; the request's own
    stops come on top of the template's, so a turn still ends where the template says.
    """
    if request.prompt is not None:
        return request.prompt, request.stop
    tokenizer = loaded.tokenizer
    if loaded.is_multimodal or not tokenizer.chat_template:
        turns = [{"role": m.role, "text": m.text, "images": len(m.images)} for m in request.messages]
        prompt, stop = render_messages(choose_template(loaded.name), turns)
    else:
        chat = [{"role": m.role, "content": m.text} for m in request.messages]
        try:
            prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            if isinstance(exc, TemplateSyntaxError):  # the model's template is broken, whatever the turns
                raise
            # The template refuses these turns (`raise_exception`: roles that do not alternate, a system turn it has
            # no place for). It failed the job as a server error (code 1, a 500 that OpenAI's client sends again).
            raise ValueError(f"the model's chat template refuses these messages: {exc}") from None
        stop = tokenizer.eos_token
    own = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    stops = tuple(dict.fromkeys(own + ((stop,) if stop else ())))
    return prompt, stops[0] if len(stops) == 1 else (stops or None)


def prepare(request: GenerateRequest, loaded: LoadedModel, max_new_tokens_cap: int) -> Prepared:
    """Render, tokenize and apply the original's limits; raises ValueError for a request it cannot serve.

    For a LLaVA model the prompt is tokenized as the original does (text chunks around each
    `<image>`), the images (one per `<image>`, else the original's ValueError) are decoded here,
    and, when the prompt leaves room, encoded by the vision tower for this task (on a thread of its own that
    ends, so no task thread keeps an OpenMP team: workers/torch_threads.py):
    the engine then gets the prompt as embeddings, one position per image feature, and counts
    those positions against its context and batch budgets. A bad image fails only its own job.
    """
    prompt, stop = render_prompt(request, loaded)
    if len(prompt) > MAX_RENDERED_CHARS:
        # Refused before it is tokenized (a million tokens took 32 s of the worker): the API counts TURN_CHARS of
        # template for each turn, and a template may add more.
        raise ValueError(f"the prompt rendered from the turns is {len(prompt)} characters long; the limit is "
                         f"{MAX_RENDERED_CHARS}")
    tokenizer = loaded.tokenizer
    vision = loaded.vision
    pixel_values = prompt_embeds = embed_tokens = None
    if vision is not None:
        images = request.all_images()
        vision.check_image_count(prompt, len(images))
        if images:
            pixel_values = vision.pixel_values(images, request.image_process_mode)
        ids = vision.tokenize(prompt, tokenizer)
        token_ids = [position for token in ids
                     for position in ([token] * vision.tokens_per_image if token < 0 else [token])]
        # The original's guard: every image counts its features and its placeholder id.
        room = loaded.context_len - len(ids) - len(images) * vision.tokens_per_image
    else:
        # A chat template may already start with BOS; do not add a second one.
        add_special = not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token))
        token_ids = tokenizer(prompt, add_special_tokens=add_special).input_ids
        room = loaded.context_len - len(token_ids)
    if not token_ids:
        # The engine's refusal was a server error (code 1, the original's "NETWORK ERROR" on its stream), which tells
        # a client to try again; a LLaVA model whose tokenizer adds no BOS (Qwen2's, llava-interleave's) made it too.
        raise ValueError("the prompt is empty: it makes no token, and generation starts from at least one")
    max_new_tokens = min(request.max_new_tokens, max_new_tokens_cap, room)
    if pixel_values is not None and max_new_tokens >= 1:

        embed_tokens = loaded.model.get_input_embeddings()
        with OTHER_CUDA_WORK:
            prompt_embeds = in_passing_thread(lambda: embed_prompt(ids, vision.encode(pixel_values), embed_tokens))
    params = SamplingParams(temperature=request.temperature, top_p=request.top_p,
                            top_k=loaded.default_top_k if request.top_k is None else request.top_k,
                            max_new_tokens=max_new_tokens, stop=stop or None, seed=request.seed)
    return Prepared(prompt, token_ids, params, prompt_embeds, embed_tokens)


def writes_behind(device: torch.device, engine_cpus: frozenset[int], other_cpus: frozenset[int]) -> bool:
    """Whether a worker writes its engine's steps on a thread of its own (`JobRunner`'s `write_behind`): where the
    engine leaves CPUs to the rest of the process (a GPU; a CPU engine on cores of its own, `ENGINE_CPUS`). A CPU
    engine computing on every core gains nothing by it: the wait for Redis's answer is when Redis and the API do the
    step's work, on those same cores, and overlapped with the next step it costs the engine as much (bench/README.md,
    "A step's write behind the engine")."""
    return device.type != "cpu" or bool(engine_cpus and other_cpus)


class JobRunner:
    """Runs jobs on one engine and keeps their records and channels current."""

    def __init__(self, store: JobStore, loaded: LoadedModel, worker_name: str, max_new_tokens_cap: int = 1024,
                 max_attempts: int = 3, stream_interval: int = 1, write_behind: bool = False,
                 hand_over: Callable[[str, str, int], None] | None = None):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, not {stream_interval}")
        self.store = store
        self.loaded = loaded
        self.worker_name = worker_name
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_attempts = max_attempts
        # Every how many tokens a job's text is written and published (Settings.stream_interval). The text of the
        # tokens since is held here, on the engine thread: `_held[job]` = (that text, the job's token count when its
        # text was last written). A worker that dies loses only text no client has seen; the record's text and
        # count always agree, so the job goes on from there elsewhere.
        self.stream_interval = stream_interval
        self._held: dict[str, tuple[str, int]] = {}
        self.engine: LLMEngine | None = None
        # Tokens a resumed job had generated before its earlier worker died.
        self._done_before: dict[str, int] = {}
        # The end of a resumed job's text that its first new token makes again (`resume_ids`): not written twice.
        self._owed: dict[str, str] = {}
        # Resumed jobs whose count before (`_done_before`) left out that token (`_tokens_before`).
        self._remade: set[str] = set()
        # Jobs whose ending `publish` wrote and counted in the metrics (`_finish` writes it again, as a no-op).
        self._observed: set[str] = set()
        # Jobs this worker runs now, and those it is handing back to the queue as it shuts down.
        self._active: set[str] = set()
        self._handed_back: set[str] = set()
        # Jobs of `_active` whose cancellation was broadcast: one heard before its request reached the engine (while
        # its prompt and images were prepared) is applied as it gets there.
        self._cancelled: set[str] = set()
        # Jobs a step's chunk of which could not be written (Redis away past the wait, or refusing the write), with
        # the error they fail with: each stops there, its record's text and count as last written (`_write_step`).
        self._text_lost: dict[str, str] = {}
        # The unwritten last chunk of a job that ended in that step, and the step's number: written with its ending
        # (`_finish`), under the same number, so that a try of the step that did reach Redis is not appended twice.
        self._last_chunk: dict[str, tuple[tuple[str, str, int, bool], int]] = {}
        # Jobs whose release is on its way: a step fenced off by it can end the job's task before it is handed back.
        self._releasing: set[str] = set()
        # Told when a job's task here leaves `run` (see the wait in `run`).
        self._runs_changed = threading.Condition()
        # Numbers this worker's writes of chunks, so that one tried again is not appended twice.
        self._steps = itertools.count(1)
        # Writes the steps that end no job while the engine goes on (workers/step_writer.py), with `write_behind`
        # (`writes_behind`); without, every step is written before the engine goes on.
        self._writer = StepWriter() if write_behind else None
        # How long a write waits for Redis to come back before it gives up (`when_redis_answers`).
        self.redis_wait_seconds = REDIS_WAIT_SECONDS
        # Endings whose write gave up (Redis away longer than that), each with the chunks written with it and their
        # step's number: written again in the background until Redis answers. The job's record names this worker as
        # its holder, so no other worker would end it while this one lives: an ending dropped left the job "running"
        # for good, and one kept without its chunks lost the job's last text while its token count held it.
        self._unwritten: dict[str, tuple[Ending, list[tuple[str, str, int, bool]], int]] = {}
        self._unwritten_lock = threading.Lock()
        self._unwritten_writer: threading.Thread | None = None
        # The error every request ends with once the engine stopped itself (`engine_stopped`), and how a job is sent
        # again then.
        self._engine_stop: str | None = None
        self._requeue: Callable[[str], None] | None = None
        # hand_over(job, queue kind, budget) sends a job to the workers of this model whose engine's MAX_BATCH_TOKENS
        # is that budget (`_hand_over`); without it, a job past this engine's budget is refused.
        self.hand_over = hand_over

    def attach(self, engine: LLMEngine) -> None:
        """Use `engine` (built with `on_step=self.publish`)."""
        self.engine = engine

    def engine_stopped(self, error: str, requeue: Callable[[str], None]) -> None:
        """The engine's on_stop hook: it stopped itself and ends every request, held or to come, with `error`.

        Those jobs are handed back as at shutdown (`requeue(job_id)` sends one again) instead of failed: the engine,
        not the job, broke, and another worker (or this one restarted) goes on with them. A job delivered from now on
        is sent again without being started. Call it before the engine fails its requests."""
        self._requeue = requeue
        self._engine_stop = error

    def run(self, job_id: str) -> str:
        """Run one job to its end; returns how it ended (its final status, or why it was skipped)."""
        if self._engine_stop is not None:
            # The engine stopped and this worker is exiting: the job goes to another worker, its record untouched.
            log.info("job %s sent again: this worker's engine stopped", job_id)
            _requeue(self._requeue, job_id, time.monotonic() + HAND_BACK_REQUEUE_SECONDS)
            return "engine_stopped"
        # A job this worker handed back as it stops can be delivered to it again before its consumer stops: the task
        # of its first attempt here ends first (its request leaves the engine and its steps are written), or its
        # `finally` cleared this run's state (`_done_before`: the job ended counting only the new tokens). A mark
        # left by a hand-back whose answer came after that task had ended (no run to clear it) is cleared here: it
        # kept this run from ever writing its ending.
        with self._runs_changed:
            while job_id in self._handed_back and job_id in self._active:
                self._runs_changed.wait()
            self._handed_back.discard(job_id)
        # A token of this delivery: a start tried again after its answer was lost (by when_redis_answers: the store's
        # client does not send a command again) gets the same answer, not "duplicate" of itself. The start waits for
        # Redis as long as it takes: one that gave up failed its task (acknowledged, so never delivered again) and left
        # the job queued with no task to run it, or, when it had run and only its answer was lost, running under this
        # live worker, which did not run it. A start that Redis refuses for good (a record its script cannot read, a
        # permission) ends the job failed, saying why: it failed the task as well, and the job stayed "queued". A job
        # another worker holds is fenced off from that ending.
        token = uuid.uuid4().hex
        try:
            status = when_redis_answers(lambda: self.store.start(job_id, self.worker_name, self.loaded.name,
                                                                 self.max_attempts, token), f"starting job {job_id}",
                                        math.inf)
        except RedisError as exc:
            log.exception("job %s could not be started", job_id)
            self._end(Ending(job_id, "failed", f"the worker could not start the job: {type(exc).__name__}: {exc}",
                             ErrorCode.SERVER_ERROR, "error"), f"failing job {job_id}")
            return "failed"
        if status in _ENDED_BEFORE_START:
            ending = _ENDED_BEFORE_START[status](self.store, job_id)
            if ending.status == "failed":
                # Said nowhere else: Celery's own line reads "succeeded ...: 'exhausted'".
                log.warning("job %s failed: %s", job_id, ending.error)
            self._end(ending, f"ending job {job_id}")
            return status
        if status not in ("running", "resumed"):
            log.info("job %s skipped: %s", job_id, status)
            return status
        self._active.add(job_id)
        try:
            return self._generate(job_id, resumed=status == "resumed")
        except Exception as exc:
            # Whatever went wrong, the job says so in its record instead of staying "running".
            log.exception("job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
            self._end(Ending(job_id, "failed", error, ErrorCode.SERVER_ERROR, "error"), f"failing job {job_id}")
            return "failed"
        finally:
            self._done_before.pop(job_id, None)
            self._owed.pop(job_id, None)
            self._remade.discard(job_id)
            self._observed.discard(job_id)
            self._held.pop(job_id, None)
            self._cancelled.discard(job_id)
            self._text_lost.pop(job_id, None)
            self._last_chunk.pop(job_id, None)
            with self._runs_changed:
                self._active.discard(job_id)
                self._handed_back.discard(job_id)
                self._runs_changed.notify_all()

    def _generate(self, job_id: str, resumed: bool) -> str:
        # Its reads and writes wait for Redis too: one that raised failed the job for an outage of a few seconds.
        try:
            request, queue = self._when_redis_answers(lambda: self.store.request_and_queue(job_id),
                                                      f"reading job {job_id}")
            if request is None:
                # A record without its request (not one llava-queue wrote, or one that expired as it was taken).
                raise ValueError(f"job {job_id}: its record holds no request")
            METRICS.note_images(job_id, request.all_images())  # its record loses them when it ends
            prepared = prepare(request, self.loaded, self.max_new_tokens_cap)
        except ValueError as exc:
            self._end(Ending(job_id, "failed", str(exc), ErrorCode.INVALID_REQUEST, "error"), f"failing job {job_id}")
            return "failed"
        # Sent again after its answer was lost, the prompt is written and published once (JobStore.set_prompt).
        if not self._when_redis_answers(lambda: self.store.set_prompt(job_id, prepared.prompt, len(prepared.token_ids),
                                                                      self.worker_name),
                                        f"writing the prompt of job {job_id}"):
            return "ended"
        if prepared.params.max_new_tokens < 1:
            # The original answers with this text and error_code 0 when the prompt fills the context.
            ending = Ending(job_id, "succeeded", finish_reason="length")
            self._record_step([(job_id, CONTEXT_OVERFLOW_MSG, 0, True)], [ending], f"ending job {job_id}")
            METRICS.observe_endings([ending])
            return "succeeded"
        text_context = None
        if resumed:
            # The worker that ran this job died: go on after the text its clients already have.
            record = self._when_redis_answers(lambda: self.store.get(job_id), f"reading job {job_id}")
            done_text, done_tokens = record["text"], record["completion_tokens"]
            if prepared.params.max_new_tokens - done_tokens < 1:
                self._end(Ending(job_id, "succeeded", finish_reason="length"), f"ending job {job_id}")
                return "succeeded"
            done_ids, owed = resume_ids(done_text, self.loaded.tokenizer)
            prepared.token_ids += done_ids
            # The text goes on from it: "▁world" after "Hello" keeps its space (SentencePiece drops it at the
            # start of a decode).
            text_context = done_ids or None
            if owed:
                # The token that ended with `owed` is made again: counted once, its text not written twice.
                self._owed[job_id] = owed
                if done_tokens > 0:
                    done_tokens -= 1
                    self._remade.add(job_id)
            self._done_before[job_id] = done_tokens
            # Its text tokenized anew may take more positions than it was generated in (a replacement character
            # of an invalid byte is three): past the context, the engine failed the job; past the prompt and new
            # tokens it first ran with (what its engine's MAX_BATCH_TOKENS admitted), it refused it as the client's
            # error, a request the client never changed.
            room = self.loaded.context_len - len(prepared.token_ids)
            max_new_tokens = min(prepared.params.max_new_tokens - max(done_tokens, len(done_ids)), room)
            if max_new_tokens < 1:
                self._end(Ending(job_id, "succeeded", finish_reason="length"), f"ending job {job_id}")
                return "succeeded"
            prepared.params = replace(prepared.params, max_new_tokens=max_new_tokens)
        # Interactive jobs first, in the engine too: those it holds beyond what its budgets admit wait there.
        priority = QUEUES.index(queue) if queue in QUEUES else 0
        # What the engine reserves for it (Sequence.max_kv_tokens: `prepare` and the resume above keep it in context).
        needed = len(prepared.token_ids) + prepared.params.max_new_tokens
        if needed > self.engine.scheduler.max_batch_tokens and self._hand_over(job_id, QUEUES[priority], needed):
            return "handed_over"
        handle = self.engine.add_request(job_id, prepared.text_token_ids, prepared.params,
                                         prompt_embeds=prepared.engine_prompt_embeds(), text_context=text_context,
                                         priority=priority)
        if job_id in self._cancelled:
            # Cancelled before the engine had it, its abort was dropped: the job was prefilled (a long prompt's chunks
            # for seconds) and ran until its first chunk found the record cancelled.
            self.engine.abort(job_id)
        output = handle.wait()
        # publish() has normally finished the record already; this covers an engine that ended the
        # request without an output step (for example at shutdown). It is a no-op otherwise.
        self._finish(output)
        if job_id in self._handed_back or job_id in self._releasing:
            return "handed_back"  # what Celery logs as the task's result (it read "cancelled")
        if job_id in self._text_lost:
            return "failed"
        return _FINAL_STATUS.get(output.finish_reason, "failed")

    def publish(self, outputs: list[SeqOutput]) -> None:
        """The engine's per-step hook: every job's new text, and the jobs that ended, in one round trip."""
        for out in outputs:
            self._hand_back_if_engine_stopped(out)
        chunks, endings = self._still_written(
            [chunk for chunk in map(self._chunk_of, outputs) if chunk is not None],
            [ending_of(out, self._tokens_before(out)) for out in outputs
             if out.finished and out.request_id not in self._handed_back])
        if chunks and not endings and self._writer is not None:
            # Written while the engine computes its next step (workers/step_writer.py).
            self._writer.submit(functools.partial(self._write_step, chunks, endings, len(outputs)))
        elif chunks or endings:
            # Written before this returns, after the step in flight: the engine resolves a finished job's handle
            # then, and its task writes the ending again (a no-op only once this one is written).
            self.flush()
            # The step in flight may have lost a job's text (and the metrics below count what is written).
            chunks, endings = self._still_written(chunks, endings)
            self._write_step(chunks, endings, len(outputs))
        # The batch size, and the jobs that ended: a background thread reads their latencies, not this one.
        METRICS.observe_step(outputs, endings)
        self._observed.update(ending.job_id for ending in endings)

    def flush(self) -> None:
        """Return once every step handed to `publish` is written."""
        if self._writer is not None:
            self._writer.wait()

    def _write_step(self, chunks: list[tuple[str, str, int, bool]], endings: list[Ending], jobs: int) -> None:
        """Append and publish a step's chunks and write its endings; a job whose record refused its chunk leaves the
        engine. While Redis is away this waits (and the engine with it, at its next step): its text would have
        nowhere to go, and a step dropped would leave a hole in a job's text.

        A step that cannot be written (Redis away past the runner's wait, or refusing the write) stops its running
        jobs there, failed (`_finish`), their records' text and count as last written: the engine went on, and their
        next chunks were appended after the lost one's place, a hole in the text that nothing told of. A job that
        ended in that step has its last chunk written with its ending (`_finish`)."""
        # Again here: a step handed to the writer before the one before it had failed still holds that one's jobs.
        chunks, endings = self._still_written(chunks, endings)
        if not (chunks or endings):
            return
        step = next(self._steps)
        try:
            seqs = self._record_step(chunks, endings, f"publishing a step of {jobs} jobs", step)
        except Exception as exc:
            error = (f"the worker could not write the job's text to Redis ({type(exc).__name__}: {exc}); the job "
                     "stopped there")
            ended = {ending.job_id for ending in endings}
            if any(chunk[0] not in ended for chunk in chunks):
                log.error("a step of %d jobs could not be written (%s: %s): those still running stop there, failed",
                          len(chunks), type(exc).__name__, exc)
            for chunk in chunks:
                if chunk[0] in ended:
                    self._last_chunk[chunk[0]] = (chunk, step)
                    continue
                self._text_lost.setdefault(chunk[0], error)
                if self.engine is not None:
                    self.engine.abort(chunk[0])
            return
        for (job_id, *_), seq in zip(chunks, seqs):
            if seq == RECORD_GONE:
                log.warning("job %s: its record is gone (Redis lost its data, or the key was deleted); the job "
                            "is dropped", job_id)
            elif seq == RECORD_DAMAGED:
                # Nothing more of it can be written: its task ends it once (`_finish`: out of the running hash), which
                # logs why. Its ending was written in the step the engine dropped it in as well, each write logged
                # (its task's with a traceback, as an error).
                self._text_lost.setdefault(job_id, DAMAGED_ERROR.format("its key holds another type than a hash"))
            if seq < 0 and self.engine is not None:
                self.engine.abort(job_id)  # the job was cancelled or ended elsewhere, or its record is gone

    def _still_written(self, chunks: list[tuple[str, str, int, bool]],
                       endings: list[Ending]) -> tuple[list[tuple[str, str, int, bool]], list[Ending]]:
        """`chunks` and `endings` without those of jobs whose text could not be written (`_text_lost`): such a job goes
        no further, and its ending is `_finish`'s."""
        return ([chunk for chunk in chunks if chunk[0] not in self._text_lost],
                [ending for ending in endings if ending.job_id not in self._text_lost])

    def _chunk_of(self, out: SeqOutput) -> tuple[str, str, int, bool] | None:
        """The chunk to write for `out`: (job, text, its token count, first token?), or None while its text is held.

        A job's first token and its last step are written at once; between them its text goes out once
        `stream_interval` tokens have come since the last write (every step when it is 1). The text held meanwhile
        comes first in the next chunk."""
        held, written = self._held.pop(out.request_id, ("", 0))
        text = held + self._past_owed(out.request_id, out.delta)
        if not (text or out.first_token):
            return None
        if not (out.first_token or out.finished or out.completion_tokens - written >= self.stream_interval):
            self._held[out.request_id] = (text, written)
            return None
        if not out.finished:
            self._held[out.request_id] = ("", out.completion_tokens)
        return out.request_id, text, out.completion_tokens + self._tokens_before(out), out.first_token

    def _tokens_before(self, out: SeqOutput) -> int:
        """The tokens of the job's earlier attempts that `out`'s count goes on from: less the one its first new token
        makes again (`_owed`) once it has made one (ended before it, cancelled or failed, the job counted one fewer
        token than its record's text holds)."""
        before = self._done_before.get(out.request_id, 0)
        return before + 1 if out.completion_tokens == 0 and out.request_id in self._remade else before

    def _past_owed(self, job_id: str, delta: str) -> str:
        """`delta` less the text of the job's record that it makes again (`_owed`). Where the new text goes another
        way (a sampled token), it follows the record's text from where the two part."""
        owed = self._owed.get(job_id)
        if not owed:
            return delta
        same = len(os.path.commonprefix([owed, delta]))
        if same == len(delta) < len(owed):
            self._owed[job_id] = owed[same:]
            return ""
        del self._owed[job_id]
        return delta[same:]

    def hand_back(self, requeue, requeue_wait: float = HAND_BACK_REQUEUE_SECONDS) -> list[str]:
        """Stop every job this worker runs and give it back to the queue, to be resumed elsewhere.

        `requeue(job_id)` sends the job again. The text generated so far stays in the record, so
        the worker that takes the job goes on from there. Returns the ids handed back.

        With Redis away, a job that cannot be released stays in the batch, not aborted (its ending would mark it
        cancelled once Redis is back): if this worker exits first, the orphan sweep of a live worker delivers it
        again once the heartbeat has expired. A requeue that fails is tried again for up to `requeue_wait` seconds
        (all jobs together): a job released but not requeued waited, held by nobody, until the sweep's claim of it a
        minute later; one still not requeued then is left to that sweep.
        """
        deadline = time.monotonic() + requeue_wait
        handed = []
        # A job handed back already (its engine stopped) is not released twice, nor sent again twice.
        for job_id in list(self._active - self._handed_back):
            self._releasing.add(job_id)
            try:
                released = self.store.release(job_id, self.worker_name)
            except RedisError as exc:
                log.warning("job %s not handed back (%s): it runs on; if this worker exits, the orphan sweep "
                            "delivers it again", job_id, exc)
                released = False
            if released:
                self._handed_back.add(job_id)  # before it leaves _releasing: its task reads one or the other
            self._releasing.discard(job_id)
            if released:
                self.engine.abort(job_id)
                handed.append(job_id)
                _requeue(requeue, job_id, deadline)
        return handed

    def _hand_over(self, job_id: str, queue: str, needed: int) -> bool:
        """Hand a job whose KV cache (`needed` tokens) this engine's MAX_BATCH_TOKENS cannot hold to the live workers
        of its model whose budget can (workers of one model given different budgets: GPUs of different sizes), those
        of the budget with the most room left; True once it has left this worker. False where no such worker is
        ready: the engine then refuses the job, the client's error (it was refused so even where another worker
        could run it).

        The job is handed back as at shutdown (`JobStore.release`, counted as a hand-over: neither an attempt nor a
        hand-back) and its task sent to the queue only the workers of that budget read (`budget_queue`), at its tail:
        the hand-overs are taken in the order they were made. Should they all be
        gone before one takes it, the orphan sweep delivers it again to its model's queue a minute later."""
        if self.hand_over is None:
            return False
        workers = self._when_redis_answers(WorkerRegistry(self.store.redis, self.store.prefix).workers,
                                           f"reading the workers for job {job_id}")
        rooms = {}
        for worker in workers:
            budget = worker.get("max_batch_tokens")  # a number where present (`WorkerRegistry.workers`)
            if worker.get("model") == self.loaded.name and worker.get("ready", True) and isinstance(budget, int) \
                    and budget >= needed:
                rooms[budget] = max(rooms.get(budget, 0), budget - worker.get("reserved_tokens", 0))
        if not rooms:
            return False
        budget = max(rooms, key=rooms.get)
        if self._when_redis_answers(lambda: self.store.release(job_id, self.worker_name, over=True),
                                    f"handing job {job_id} over"):
            log.info("job %s needs %d tokens of KV cache, more than this worker's MAX_BATCH_TOKENS (%d): handed over "
                     "to the workers of its model with a budget of %d", job_id, needed,
                     self.engine.scheduler.max_batch_tokens, budget)
            _requeue(lambda job: self.hand_over(job, queue, budget), job_id,
                     time.monotonic() + HAND_BACK_REQUEUE_SECONDS)
        return True  # released, or not this worker's any more (cancelled, or ended, since it started)

    def _hand_back_if_engine_stopped(self, out: SeqOutput) -> None:
        """Hand back the job of an output that ended because the engine stopped itself (`engine_stopped`), instead
        of writing it failed; it is then in `_handed_back`, and no ending of this worker is written for it.

        With Redis away it is not released and stays "running" under this worker, failed neither: once this worker
        has exited (its engine stopped, it does), the orphan sweep of a live worker delivers it again."""
        job_id = out.request_id
        if self._engine_stop is None or out.error != self._engine_stop or job_id in self._handed_back:
            return
        self._handed_back.add(job_id)
        try:
            released = self.store.release(job_id, self.worker_name)
        except RedisError as exc:
            log.warning("job %s not handed back (%s): the orphan sweep delivers it again once this worker has exited",
                        job_id, exc)
            return
        if released:
            log.warning("job %s handed back to the queue: this worker's engine stopped", job_id)
            _requeue(self._requeue, job_id, time.monotonic() + HAND_BACK_REQUEUE_SECONDS)

    def cancel(self, job_id: str) -> None:
        """A cancellation broadcast: drop the job from the batch if this worker holds it (as its request reaches
        the engine, if it has not yet)."""
        if job_id in self._active:
            self._cancelled.add(job_id)
        if self.engine is not None:
            self.engine.abort(job_id)

    def _finish(self, out: SeqOutput) -> None:
        self.flush()  # its held text goes after the job's chunk in flight, if any
        held, _ = self._held.pop(out.request_id, ("", 0))
        if out.request_id in self._text_lost:
            # Its text stops at the last chunk written: nothing after it (held text included) is, and the record's
            # token count stays the one written with that text.
            self._end(Ending(out.request_id, "failed", self._text_lost[out.request_id], ErrorCode.SERVER_ERROR,
                             "error"), f"failing job {out.request_id}")
            return
        self._hand_back_if_engine_stopped(out)  # a request added once the engine had stopped: never published
        if out.request_id not in self._handed_back:
            done_before = self._tokens_before(out)
            # Text held for the next chunk of a job the engine ended without a step (at shutdown): its ending counts
            # those tokens, so the record's text gets them first, in the same round trip: written apart, a worker
            # that died between the two left the text written and the job "running", to be run again elsewhere.
            chunks = [(out.request_id, held, out.completion_tokens + done_before, False)] if held else []
            last, step = self._last_chunk.pop(out.request_id, (None, None))
            if last is not None:
                # Its last step was not written: its chunk goes with the ending, under that step's number.
                chunks = [last]
            self._end(ending_of(out, done_before), f"ending job {out.request_id}", chunks,
                      observe=out.request_id not in self._observed, step=step)

    def _end(self, ending: Ending, what: str, chunks: list[tuple[str, str, int, bool]] | None = None,
             observe: bool = True, step: int | None = None) -> None:
        """Write a job's ending, after its `chunks` (`record_step`'s) in the same round trip, waiting for Redis while
        it is away; an ending that gives up is kept and written again in the background (`_write_unwritten`) instead
        of lost, which left the job "running" for good (its chunks are not: a client has not seen their text).
        With `observe`, a written ending is counted in the worker's metrics (a job failed by a bad image was not).

        An ending Redis refuses for good (a permission an ACL denies, NOPERM; a record of another type, WRONGTYPE: the
        same write would fail again) is logged, not raised: raised, it escaped `run` and failed the Celery task
        (acknowledged, so never delivered again), and nothing more could be done for the job either way."""
        step = next(self._steps) if step is None else step
        try:
            self._record_step(chunks or [], [ending], what, step)
            if observe:
                METRICS.observe_endings([ending])
        except DamagedRecord as exc:
            # Its record is of another type (a key SET by hand): its message says all there is, a traceback nothing.
            log.warning("%s; its ending (%s) is not written, and the job is dropped", exc.message, ending.status)
        except RedisError as exc:
            if not redis_answers_later(exc):
                log.exception("job %s: its ending (%s) cannot be written: Redis refuses it for good (%s: %s); the job "
                              "keeps the state Redis has for it", ending.job_id, ending.status, type(exc).__name__,
                              exc)
                return
            log.warning("job %s: its ending (%s) not written (%s); written once Redis answers", ending.job_id,
                        ending.status, exc)
            with self._unwritten_lock:
                self._unwritten[ending.job_id] = (ending, chunks or [], step)
                if self._unwritten_writer is None or not self._unwritten_writer.is_alive():
                    self._unwritten_writer = threading.Thread(target=self._write_unwritten, daemon=True,
                                                              name="unwritten-endings")
                    self._unwritten_writer.start()

    def _write_unwritten(self, interval: float = 1.0) -> None:
        """Write the kept endings, with their chunks under their steps' numbers (a try that had reached Redis is not
        appended twice), every `interval` seconds, until none is left. An ending fenced off meanwhile (this worker was
        thought dead and the job went elsewhere) or of a job that had ended is dropped by Redis itself. If this worker
        exits first, the sweep of a live worker delivers the job again, whose start ends it."""
        while True:
            time.sleep(interval)
            with self._unwritten_lock:
                pending = list(self._unwritten.values())
                if not pending:
                    self._unwritten_writer = None
                    return
            written = 0
            for entry in pending:
                ending, chunks, step = entry
                try:
                    self.store.record_step(self.worker_name, chunks, [ending], step)
                    written += 1
                except Exception as exc:
                    if redis_answers_later(exc):
                        break  # still away: this one and those after it next time
                    # Not an outage nor a passing refusal: trying again would fail again. The job goes as a job whose
                    # ending failed went before: its holder's heartbeat ends with this worker, then the sweep takes it.
                    log.exception("writing the ending of job %s failed; dropped", ending.job_id)
                with self._unwritten_lock:
                    if self._unwritten.get(ending.job_id) is entry:
                        del self._unwritten[ending.job_id]
            if written:
                log.info("Redis is back: %d endings written", written)

    def _record_step(self, chunks: list[tuple[str, str, int, bool]], endings: list[Ending], what: str,
                     step: int | None = None) -> list[int]:
        """`JobStore.record_step` for this worker, waiting for Redis while it is away (`when_redis_answers`); a try
        again carries the same step number (`step`, else the next), so chunks the lost try had written are not
        written twice."""
        step = next(self._steps) if step is None else step
        return self._when_redis_answers(lambda: self.store.record_step(self.worker_name, chunks, endings, step), what)

    def _when_redis_answers(self, call: Callable[[], T], what: str) -> T:
        """`when_redis_answers` within this runner's wait."""
        return when_redis_answers(call, what, self.redis_wait_seconds)


def _requeue(requeue: Callable[[str], None], job_id: str, deadline: float) -> None:
    """requeue(job_id), tried again (0.1 s apart, doubling to 1 s) until it works or `deadline` (monotonic) passes."""
    delay = 0.1
    while True:
        try:
            requeue(job_id)
            return
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                log.warning("job %s handed back but not requeued (%s): the orphan sweep delivers it again", job_id,
                            exc)
                return
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def when_redis_answers(write: Callable[[], T], what: str, wait_seconds: float = REDIS_WAIT_SECONDS) -> T:
    """write(), tried again while Redis cannot be reached or refuses commands for a while (`redis_answers_later`: out
    of memory, a read-only replica in a failover...), 0.1 s apart, doubling to 2 s, for up to `wait_seconds`; any
    other error is raised at once.

    A job that ended while Redis was restarting used to lose its final write, and with it the job (its
    task failed, and was acknowledged). Connection errors and timeouts are retried (a timeout, from a Redis
    paused or a network dropping packets, was not: the step raised at once, where the writer of unwritten
    endings retried both). A connection cut, or a timeout, while Redis was answering may have run the write, or
    part of a pipelined step: the runner's writes carry a step number for that (`JobRunner._record_step`), its
    endings end a job once, a start carries a token of its delivery, and a prompt is written once per start.
    """
    deadline, delay, warned = time.monotonic() + wait_seconds, 0.1, False
    while True:
        try:
            result = write()
        except RedisError as exc:
            if not redis_answers_later(exc) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                log.warning("Redis cannot be reached or takes no writes (%s): %s waits for it%s", exc, what,
                            f", up to {wait_seconds:.0f} s" if math.isfinite(wait_seconds) else "")
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
            continue
        if warned:
            log.info("Redis is back: %s done", what)
        return result


def resume_ids(text: str, tokenizer) -> tuple[list[int], str]:
    """The ids a resumed job's prompt goes on with for the `text` it has, and the end of that text its first new
    token is to make again ("" when none).

    Text that ends in white space may end inside a token: a token's text held back as the start of a stop string
    (" <" with the stop "</s>", " l" with "lies") leaves its space in the record. Tokenized anew, the prompt ended in
    a lone space token, which models seldom make, and the model went on from it with other text than it would have
    ("A gentle ire" for "A gentle lapping"). That last token is left out and made again instead (greedy decoding
    makes the same text; the job's count takes the token once)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids if text else []
    if not ids or not text[-1].isspace():
        return ids, ""
    kept = tokenizer.decode(ids[:-1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    owed = text[len(kept):]
    if not text.startswith(kept) or owed.strip():
        return ids, ""
    return ids[:-1], owed


def ending_of(out: SeqOutput, done_before: int = 0) -> Ending:
    """How the job of a finished engine output ends; `done_before` counts tokens of an earlier attempt."""
    status = _FINAL_STATUS.get(out.finish_reason, "failed")
    tokens = done_before + out.completion_tokens
    if status == "cancelled":
        return Ending(out.request_id, status, CANCELLED_ERROR, ErrorCode.CANCELLED, "cancelled", tokens)
    if status == "failed":
        # A request the engine can never run (out of range, past its token budget) is the client's error (a 400 to
        # an OpenAI client); it was the server's, which the `openai` package tries again, to meet the same.
        code = ErrorCode.INVALID_REQUEST if out.refused else ErrorCode.SERVER_ERROR
        return Ending(out.request_id, status, out.error or "generation failed", code, "error", tokens)
    return Ending(out.request_id, status, finish_reason=out.finish_reason, completion_tokens=tokens)
