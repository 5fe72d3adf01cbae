"""The engine loop: one background thread that admits, prefills, decodes and streams every request.

Other threads only talk to it through `add_request` and `abort`, which put work
in an inbox under a lock and wake the loop; everything else (scheduler, batch,
tokenizer) belongs to the engine thread alone.
"""

from __future__ import annotations

import logging
import math
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared.cpus import keep_to
from workers.engine.detokenizer import Detokenizer, special_token_id
from workers.engine.model_runner import Batch, ModelRunner
from workers.engine.sampling import NOT_FINITE, sample
from workers.engine.scheduler import Scheduler
from workers.engine.sequence import SamplingParams, Sequence

log = logging.getLogger("llava_queue.engine")

SHUTDOWN_ERROR = "engine shut down"
# What a request ends with when the model's logits for it are not numbers (sampling.NOT_FINITE).
NOT_FINITE_ERROR = "model output not finite: NaN or infinite logits (the model's activations overflowed in its dtype)"


@dataclass
class SeqOutput:
    """What one request produced in one step (or its final state when `finished`).

    delta is the text new since the last output, text all generated text so
    far (the stop string removed); joined deltas always equal text.
    first_token is True on the first output that carries generated tokens.
    token_ids holds every generated id, on the final output only.
    """

    request_id: str
    delta: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    first_token: bool = False
    token_ids: list[int] = field(default_factory=list)
    # The error is the request's own (Sequence.refuse): it can never run on this engine.
    refused: bool = False


class RequestHandle:
    """The caller's side of one request: `done` is set once its final output is published."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.done = threading.Event()
        self.output: SeqOutput | None = None

    def wait(self, timeout: float | None = None) -> SeqOutput:
        """Block until the request finishes and return its final output; TimeoutError after `timeout` seconds."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        assert self.output is not None
        return self.output

    def _resolve(self, output: SeqOutput) -> None:
        self.output = output
        self.done.set()


class LLMEngine:
    """Continuous batching over one Hugging Face causal LM.

    max_num_seqs, max_batch_tokens and max_prefill_tokens are the scheduler's budgets (rows,
    KV positions of the left-padded running batch, and the padded prompt positions of one
    prefill forward; None: no limit; see scheduler.py); max_model_len caps
    prompt + new tokens (default: the model's max_position_embeddings).
    on_step(outputs) is called once after every step, from the engine thread,
    with one SeqOutput per request that has new text, its first token, or
    finished in that step (possibly an empty list). An Exception it raises is
    logged and the engine goes on; anything else (sys.exit(), KeyboardInterrupt)
    ends the engine thread, and every request it had or is given then ends with
    an "engine stopped: ..." error. on_stop(error), if set, is called first
    with that error, from the engine thread: its owner learns that this engine
    will serve nothing more before any request is failed (the worker hands its
    jobs back and exits, workers/main.py).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_num_seqs: int = 32,
        max_batch_tokens: int = 16384,
        max_prefill_tokens: int | None = None,
        max_model_len: int | None = None,
        on_step: Callable[[list[SeqOutput]], None] | None = None,
        on_stop: Callable[[str], None] | None = None,
        cpus: frozenset[int] | None = None,
        forward: str = "auto",
        batch_invariant: bool = False,
    ):
        """`cpus`: the CPUs the engine thread computes on, one torch thread each (shared/cpus.py); None: wherever
        the process runs, with torch's default thread count. `forward`: model_runner.FORWARDS. `batch_invariant`:
        see ModelRunner."""
        self.tokenizer = tokenizer
        self.cpus = cpus
        self.runner = ModelRunner(model, max_kv_positions=max_batch_tokens, forward=forward,
                                  batch_invariant=batch_invariant)
        self.scheduler = Scheduler(max_num_seqs, max_batch_tokens, max_prefill_tokens)
        self.max_model_len = max_model_len or getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.on_step = on_step
        self.on_stop = on_stop

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[tuple[Sequence, RequestHandle]] = []
        # (request id, how many of the inbox's requests were added before the abort): taken in call order.
        self._aborts: list[tuple[str, int]] = []
        self._stopping = False
        self._closed = False
        # What a request added once the engine is closed ends with.
        self._close_error = SHUTDOWN_ERROR
        self._thread: threading.Thread | None = None

        # Engine-thread state.
        self._batch: Batch | None = None
        self._live: dict[str, Sequence] = {}
        self._handles: dict[Sequence, RequestHandle] = {}
        self._step_deltas: dict[Sequence, str] = {}
        # Set by a prefill that left the running batch no larger: the batch decodes before the next prefill.
        self._decode_owed = False
        # A prompt longer than the prefill budget, prefilled a chunk a step (scheduler.is_long): its sequence and
        # the one-row batch of the chunks so far (None before the first); it joins the running batch after the last.
        self._chunked: tuple[Sequence, Batch | None] | None = None
        # Whether the next step is the chunk's: a step of the running batch (or an admission) goes between two.
        self._chunk_turn = False
        self._stats = {
            "num_running": 0, "num_waiting": 0, "reserved_tokens": 0, "batch_len": 0,
            "steps": 0, "num_finished": 0, "generated_tokens": 0,
            "max_num_seqs": max_num_seqs, "max_batch_tokens": max_batch_tokens,
            "max_prefill_tokens": max_prefill_tokens,
        }

    # Caller side (any thread).

    def start(self) -> None:
        """Start the engine thread (once)."""
        with self._lock:
            if self._thread is not None or self._stopping or self._closed:
                return
            self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread; every request not finished yet ends with an "engine shut down" error."""
        with self._wakeup:
            if self._stopping:
                return
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._close(SHUTDOWN_ERROR)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        text_context: list[int] | None = None,
        priority: int = 0,
    ) -> RequestHandle:
        """Queue a request; returns its handle at once (thread-safe).

        prompt_embeds [T, H], when given, is what the model reads instead of
        the ids (the vision path); the ids are then not read (the text is that
        of the generated ids alone) and may be empty. text_context: ids of
        text the output goes on from (a resumed job's), decoded with its first
        tokens so their leading space is as in a whole decode. priority: waiting
        requests are admitted lowest first, in arrival order within one (the
        worker gives interactive jobs 0, batch jobs 1). Bad input finishes the
        request with an error, it never raises here.
        """
        seq, error = _new_sequence(request_id, prompt_token_ids, params, prompt_embeds, text_context, priority)
        handle = RequestHandle(request_id)
        if error is not None:
            seq.refuse(error)
        else:
            with self._wakeup:
                if not self._closed:
                    self._inbox.append((seq, handle))
                    self._wakeup.notify()
                    return handle
                error = self._close_error
            seq.finish("error", error)
        handle._resolve(_output(seq, "", first_token=False))
        return handle

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe): it leaves the batch at the next step with finish_reason "cancelled".
        Once the engine has closed (shut down, or stopped) it does nothing: no request is left to cancel.

        TypeError when request_id is not a string (no request has such an id; in the engine's step it would fail
        every running request).
        """
        error = _request_id_error(request_id)
        if error is not None:
            raise TypeError(error)
        with self._wakeup:
            # Once closed, no step takes aborts any more (and no request runs): kept, they grew for ever.
            if self._closed:
                return
            self._aborts.append((request_id, len(self._inbox)))
            self._wakeup.notify()

    def stats(self) -> dict:
        """A snapshot as a dict: num_running, num_waiting, reserved_tokens (of max_batch_tokens), batch_len (KV
        columns of the running batch), steps, num_finished, generated_tokens, max_num_seqs, max_batch_tokens."""
        with self._lock:
            stats = dict(self._stats)
            stats["num_waiting"] += len(self._inbox)
        return stats

    # Engine side.

    def step(self) -> list[SeqOutput]:
        """Run one iteration: take new requests and aborts, then prefill what the budgets admit, else decode.

        A step is one forward: admitted sequences are prefilled first (their first
        token is published at the end of this step, not after a decode of the
        others too), and the running batch decodes in the steps without admissions,
        and in the step after a prefill that left it no larger (all it admitted
        ended at their first token), so that such requests cannot starve it.
        A prompt longer than the prefill budget is prefilled a chunk of the budget
        a step, every other step, so the running batch goes on decoding meanwhile
        (vLLM's and TGI's chunked prefill; one step of a whole 8,000-token prompt
        held every stream for tens of seconds on a CPU).
        Returns the outputs it also passed to on_step. The engine thread calls
        this in a loop; call it yourself only on an engine not start()ed.
        """
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for seq, handle in inbox:
            self._register(seq, handle)
        with torch.inference_mode():
            try:
                self._take_inbox([seq for seq, _ in inbox], aborts)
                self._drop_finished_rows()
                stepped = (self._chunked is None or not self._chunk_turn) and self._prefill_or_decode()
                if stepped or self._chunked is None:
                    self._chunk_turn = True
                else:
                    self._prefill_chunk()
                    self._chunk_turn = False
            except Exception as exc:
                # A bug or a failure outside one forward: the batch state is suspect, so fail what runs on it.
                log.exception("engine step failed")
                self._fail_all_but_waiting(f"engine step failed: {type(exc).__name__}: {exc}")
        return self._publish()

    def use_this_thread(self) -> None:
        """Put the calling thread on the engine's CPUs, with one torch thread per CPU (nothing without `cpus`).

        The engine thread does it as it starts; a thread that steps an engine not started (a warm-up) may too.
        Call it before the thread's first parallel op: its OpenMP team is made then, on these CPUs.
        """
        if self.cpus:
            keep_to(self.cpus)
            torch.set_num_threads(len(self.cpus))

    def _loop(self) -> None:
        self.use_this_thread()
        try:
            self._serve()
        except BaseException as exc:
            # What is not an Exception (sys.exit() or KeyboardInterrupt in on_step) asks this thread to end. It ends,
            # but first ends every request, now and to come, with the reason: each has a waiter, and no one else steps.
            log.critical("engine thread stopped by %s", type(exc).__name__, exc_info=True)
            error = f"engine stopped: {type(exc).__name__}: {exc}"
            self._report_stop(error)
            try:
                self._close(error)
            except BaseException:
                # on_step raised again as the requests were failed; _publish resolved their handles all the same.
                log.exception("on_step failed again as the engine stopped")

    def _prefill_or_decode(self) -> bool:
        """Prefill what the scheduler admits, else decode the running batch. Returns whether a forward ran (a long
        prompt admitted is only set to be prefilled in chunks)."""
        owed = self._decode_owed and self._batch is not None
        admitted = [] if owed else self.scheduler.admit(long_prompts=self._chunked is None)
        if len(admitted) == 1 and self.scheduler.is_long(admitted[0]):
            self._chunked = (admitted[0], None)
            return False
        if admitted:
            rows_before = len(self.scheduler.running) - len(admitted)
            self._prefill(admitted)
            # Prefilling ahead of the batch's decode pays while it fills the batch. Requests that end at their first
            # token (max_new_tokens 1) leave as fast as they come: a stream of them would keep the running batch
            # from ever decoding.
            self._decode_owed = len(self.scheduler.running) <= rows_before
            return True
        if self._batch is not None:
            self._decode()
            self._decode_owed = False
            return True
        return False

    def _serve(self) -> None:
        """Step while there is work, sleep while there is none, until shutdown()."""
        while True:
            with self._wakeup:
                # Sleep until there is something to do; add_request and abort notify.
                while not (self._stopping or self._inbox or self._aborts or self.scheduler.has_work()):
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:
                # step() fails the batch itself when a forward fails; whatever else escapes it must not end this
                # thread, on which every request waits: fail what runs (its state is suspect), answer it, go on.
                log.exception("engine step failed")
                try:
                    self._fail_all_but_waiting(f"engine step failed: {type(exc).__name__}: {exc}")
                    self._publish()
                except Exception:
                    log.exception("the engine could not fail its running requests")

    def _report_stop(self, error: str) -> None:
        """Tell on_stop that this engine stopped itself; whatever it raises, the requests are still ended after."""
        if self.on_stop is None:
            return
        try:
            self.on_stop(error)
        except BaseException:
            log.exception("on_stop failed")

    def _register(self, seq: Sequence, handle: RequestHandle) -> None:
        self._handles[seq] = handle

    def _close(self, error: str) -> None:
        """Refuse new requests and end every one not finished yet with `error`. Only once the engine thread has
        stopped (or from it)."""
        with self._lock:
            if not self._closed:
                self._closed, self._close_error = True, error
            inbox, self._inbox, self._aborts = self._inbox, [], []
        self._batch = self._chunked = None
        for seq, handle in inbox:
            self._register(seq, handle)
        for seq in list(self._handles):
            self._finish(seq, "error", error)
        self._publish()

    def _take_inbox(self, seqs: list[Sequence], aborts: list[tuple[str, int]]) -> None:
        """Take the new sequences and the aborts in the order they were called: an abort then a new request with
        the same id cancels the old one and runs the new one; a new request then its abort cancels the new one."""
        taken = 0
        for request_id, added_before in aborts:
            for seq in seqs[taken:added_before]:
                self._intake(seq)
            taken = max(taken, added_before)
            self._abort(request_id)
        for seq in seqs[taken:]:
            self._intake(seq)

    def _intake(self, seq: Sequence) -> None:
        """Prepare a new (registered) sequence and queue it, or finish it at once with the reason it cannot run."""
        holder = self._live.get(seq.request_id)
        # A holder that ended (cancelled just before, in this step) no longer owns the id.
        duplicate = holder is not None and not holder.is_finished
        if not duplicate:
            self._live[seq.request_id] = seq
        try:
            error = "duplicate request id: a request with this id is still running" if duplicate else self._prepare(seq)
        except Exception as exc:
            log.exception("request %s rejected", seq.request_id)
            error = f"invalid request: {type(exc).__name__}: {exc}"
        else:
            # What `_prepare` answers is the request's own fault: every try of it meets the same.
            seq.refused = error is not None and not duplicate
        if error is not None:
            self._finish(seq, "error", error)
        elif not self.scheduler.add(seq):
            self._emit(seq, "")

    def _prepare(self, seq: Sequence) -> str | None:
        """Fill in what the engine derives from a request; returns why it cannot run, or None."""
        limit = seq.params.max_new_tokens
        # A float NaN passed `< 1` and `min()` alike: the request ran past its budgets and the context.
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            return f"max_new_tokens must be a whole number of at least 1, got {limit!r}"
        for name in ("temperature", "top_p"):
            value = getattr(seq.params, name)
            # Not a number, the batch's sampling fails for every row, and the request with "model forward failed".
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{name} must be a finite number, got {value!r}"
        # Not a whole number, top_k failed the sampling of every row of its batch, and the request with "model forward
        # failed"; a seed out of the generator's 64 bits with an unclear "invalid request: ValueError: Overflow ...".
        top_k, seed = seq.params.top_k, seq.params.seed
        if _whole_number(top_k) is None:
            return f"top_k must be a whole number (0 or less keeps every token), got {top_k!r}"
        if seed is not None and not -2**63 <= _whole_number(seed, default=2**64) < 2**64:
            return f"seed must be a whole number in [-2^63, 2^64), got {seed!r}"
        error = self.runner.check_prompt(seq)
        if error is not None:
            return error
        if self.max_model_len is not None:
            room = self.max_model_len - seq.prompt_len
            if room < 1:
                return (f"prompt of {seq.prompt_len} tokens leaves no room in the model's "
                        f"{self.max_model_len}-token context")
            seq.max_new_tokens = min(seq.params.max_new_tokens, room)
        stop_ids, text_stops = self._split_stops(seq.params.stop_strings)
        eos_ids = frozenset() if seq.params.ignore_eos else self.eos_token_ids
        seq.stop_token_ids = eos_ids | stop_ids
        seq.detokenizer = Detokenizer(self.tokenizer, text_stops, seq.text_context)
        if seq.params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(_whole_number(seq.params.seed))
        return None

    def _split_stops(self, stops: tuple[str, ...]) -> tuple[frozenset[int], tuple[str, ...]]:
        """The ids of the stops that are one special token, and the stops to look for in the text (all of them).

        A special token never shows up in the (special-free) text, so its id ends generation; ordinary tokens can
        still spell its text out ("</", "s", ">"), which ends it too, as the original's keyword check does.
        """
        ids = {special_token_id(self.tokenizer, stop) for stop in stops}
        return frozenset(ids - {None}), stops

    def _abort(self, request_id: str) -> None:
        seq = self._live.get(request_id)
        if seq is not None and not seq.is_finished:
            log.debug("request %s cancelled", request_id)
            self._finish(seq, "cancelled")

    def _drop_finished_rows(self) -> None:
        if self._chunked is not None and self._chunked[0].is_finished:
            self._chunked = None  # cancelled between two chunks: its cache goes with it
        if self._batch is not None:
            keep = [row for row, seq in enumerate(self._batch.seqs) if not seq.is_finished]
            self._batch = self.runner.filter(self._batch, keep)

    def _decode(self) -> None:
        """One new token for every running row."""
        batch = self._batch
        log.debug("decode %d rows, kv length %d", len(batch), batch.kv_len)
        input_ids = torch.tensor([seq.output_token_ids[-1] for seq in batch.seqs], device=self.runner.device)
        try:
            tokens = self._sample(batch.seqs, self.runner.decode(batch, input_ids))
        except Exception as exc:
            log.exception("decode forward of %d rows failed", len(batch))
            self._batch = None
            for seq in list(batch.seqs):
                self._finish(seq, "error", _forward_failed(exc))
            return
        self._append_tokens(batch.seqs, tokens)
        self._drop_finished_rows()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill admitted sequences (their first token) and merge them into the running batch."""
        log.debug("prefill %d rows, longest prompt %d", len(seqs), max(seq.prompt_len for seq in seqs))
        self._join(self._prefill_group(seqs))

    def _join(self, new_batch: Batch | None) -> None:
        """Merge prefilled rows into the running batch."""
        if new_batch is not None:
            batches = [b for b in (self._batch, new_batch) if b is not None]
            self._batch = self.runner.concatenate(batches)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the long prompt; after its last, sample its first token and merge it in."""
        seq, batch = self._chunked
        done = 0 if batch is None else batch.cache.width
        end = min(seq.prompt_len, done + self.scheduler.max_prefill_tokens)
        log.debug("prefill chunk %d:%d of request %s's %d-token prompt", done, end, seq.request_id, seq.prompt_len)
        try:
            batch, logits = self.runner.prefill_chunk(seq, batch, end)
            self._chunked = (seq, batch) if end < seq.prompt_len else None
            if self._chunked is not None:
                return
            tokens = self._sample([seq], logits)
        except Exception as exc:
            log.exception("prefill of request %s failed", seq.request_id)
            self._chunked = None
            self._finish(seq, "error", _forward_failed(exc))
            return
        self._append_tokens([seq], tokens)
        self._join(self.runner.filter(batch, [] if seq.is_finished else [0]))

    def _prefill_group(self, seqs: list[Sequence], spare: bool | None = None) -> Batch | None:
        """Prefill `seqs` together; if that fails, one by one, so only a sequence that fails alone is failed.

        `spare`: whether the cache gets spare rows and columns (ModelRunner.prefill); None: when it is to become the
        running batch (there is none)."""
        spare = self._batch is None if spare is None else spare
        try:
            batch, logits = self.runner.prefill(seqs, spare=spare)
            tokens = self._sample(seqs, logits)
        except Exception as exc:
            if len(seqs) > 1:
                log.warning("prefill of %d rows failed (%s: %s), retrying one by one", len(seqs),
                            type(exc).__name__, exc)
                # Only the part the others merge into takes spare room: each took up to the whole KV budget, all
                # held at once (3.7 budgets for 4 short prompts), and a group that failed for want of memory failed
                # again one by one.
                parts = []
                for seq in seqs:
                    part = self._prefill_group([seq], spare=spare and not parts)
                    if part is not None:
                        parts.append(part)
                return self.runner.concatenate(parts) if parts else None
            log.exception("prefill of request %s failed", seqs[0].request_id)
            self._finish(seqs[0], "error", _forward_failed(exc))
            return None
        self._append_tokens(seqs, tokens)
        return self.runner.filter(batch, [row for row, seq in enumerate(batch.seqs) if not seq.is_finished])

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        generators = [seq.generator for seq in seqs]
        if all(generator is None for generator in generators):
            generators = None
        temperature = [seq.params.temperature for seq in seqs]
        top_p = [seq.params.top_p for seq in seqs]
        top_k = [seq.params.top_k for seq in seqs]
        return sample(logits, temperature, top_p, generators, top_k).tolist()

    def _append_tokens(self, seqs: list[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens):
            try:
                self._append_token(seq, token)
            except Exception as exc:
                log.exception("request %s failed on token %d", seq.request_id, token)
                self._finish(seq, "error", f"detokenization failed: {type(exc).__name__}: {exc}")

    def _append_token(self, seq: Sequence, token: int) -> None:
        """Record one generated token, stream its text, and finish the sequence on EOS, stop or length (or with an
        error when its logits were not finite: no token)."""
        if token == NOT_FINITE:
            log.warning("request %s: the model's logits are not finite after %d new tokens", seq.request_id,
                        len(seq.output_token_ids))
            self._finish(seq, "error", NOT_FINITE_ERROR)
            return
        seq.output_token_ids.append(token)
        self._stats["generated_tokens"] += 1
        reason = None
        if token in seq.stop_token_ids:
            reason = "stop"
            delta = ""
        else:
            delta = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                reason = "stop"
        if reason is None and len(seq.output_token_ids) >= seq.max_new_tokens:
            reason = "length"
        self._emit(seq, delta)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """End a sequence for `reason`, free its budget, and release the text it still held back."""
        if seq.is_finished:
            return
        held = ""
        if seq.detokenizer is not None:
            try:
                held = seq.detokenizer.finish()
            except Exception:
                # Raising here would leave the sequence running, and it is called from the handlers of failures.
                log.exception("request %s: releasing its held-back text failed", seq.request_id)
        if reason == "length" and seq.detokenizer is not None and seq.detokenizer.stopped:
            reason = "stop"  # the text held back to the end completed a stop string
        self.scheduler.finish(seq, reason, error)
        self._emit(seq, held)

    def _fail_all_but_waiting(self, error: str) -> None:
        """Fail the running sequences and any not queued yet; the queued ones never touched the broken state."""
        self._batch = self._chunked = None
        for seq in list(self._handles):
            if not seq.is_finished and seq not in self.scheduler.waiting:
                self._finish(seq, "error", error)

    def _emit(self, seq: Sequence, delta: str) -> None:
        self._step_deltas[seq] = self._step_deltas.get(seq, "") + delta

    def _publish(self) -> list[SeqOutput]:
        """Turn this step's deltas into outputs, hand them to on_step, then resolve finished handles."""
        outputs, finished = [], []
        for seq, delta in self._step_deltas.items():
            first_token = bool(seq.output_token_ids) and not seq.first_token_reported
            if not (delta or first_token or seq.is_finished):
                continue
            seq.first_token_reported = seq.first_token_reported or first_token
            output = _output(seq, delta, first_token)
            outputs.append(output)
            if seq.is_finished:
                finished.append((seq, output))
        self._step_deltas = {}
        self._update_stats(len(finished))
        try:
            if self.on_step is not None:
                try:
                    self.on_step(outputs)
                except Exception:
                    log.exception("on_step callback failed")
        finally:
            # Resolve after on_step, so a caller waiting on a handle finds the final chunk already published; and
            # when on_step raises what is not an Exception too: nothing would publish these requests again.
            for seq, output in finished:
                handle = self._handles.pop(seq, None)
                if self._live.get(seq.request_id) is seq:
                    del self._live[seq.request_id]
                if handle is not None:
                    handle._resolve(output)
        return outputs

    def _update_stats(self, num_finished: int) -> None:
        with self._lock:
            self._stats["steps"] += 1
            self._stats["num_finished"] += num_finished
            self._stats.update(
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                reserved_tokens=self.scheduler.reserved_tokens,
                batch_len=0 if self._batch is None else self._batch.kv_len,
            )


def _forward_failed(exc: Exception) -> str:
    """The error a request ends with when a forward it was in failed."""
    return f"model forward failed: {type(exc).__name__}: {exc}"


def _request_id_error(request_id: object) -> str | None:
    """Why `request_id` cannot name a request, or None when it can."""
    if isinstance(request_id, str):
        return None
    return f"request_id must be a string, got {type(request_id).__name__}"


def _new_sequence(
    request_id: object,
    prompt_token_ids: object,
    params: object,
    prompt_embeds: object,
    text_context: object,
    priority: object = 0,
) -> tuple[Sequence, str | None]:
    """add_request's arguments as a new Sequence, and why their form keeps it out of the engine (None: it may enter;
    the engine checks the values as it takes it). What is refused is left out of the sequence, so that reporting the
    request cannot fail: that is done in the step that publishes every request's output."""
    # The ids are copied here, so that the caller may reuse its lists.
    prompt_ids, prompt_error = _token_ids(prompt_token_ids, "prompt_token_ids")
    context_ids, context_error = _token_ids(text_context, "text_context")
    params = SamplingParams() if params is None else params
    params_error = None
    if not isinstance(params, SamplingParams):
        params_error, params = f"params must be a SamplingParams, got {type(params).__name__}", SamplingParams()
    elif (params_error := _stop_error(params.stop)) is not None:
        params = replace(params, stop=None)
    embeds_error = None
    # Anything else (torch.Tensor itself, a call forgotten) may have a `shape` that is no shape.
    if prompt_embeds is not None and not isinstance(prompt_embeds, torch.Tensor):
        embeds_error = f"prompt_embeds must be a torch.Tensor, got {type(prompt_embeds).__name__}"
        prompt_embeds = None
    priority_error = None
    if not isinstance(priority, int) or isinstance(priority, bool):
        priority_error, priority = f"priority must be an int, got {type(priority).__name__}", 0
    seq = Sequence(request_id, prompt_ids, params, params.max_new_tokens, prompt_embeds=prompt_embeds,
                   text_context=context_ids, priority=priority)
    # An id that is not a string never enters the engine: it keys its requests by id, and in its step an unhashable
    # one would fail every running request.
    error = (_request_id_error(request_id) or params_error or prompt_error or embeds_error or context_error
             or priority_error)
    return seq, error


def _whole_number(value: object, default: int | None = None) -> int | None:
    """`value` as an int when it is a whole number (an int, a numpy integer; never a bool), else `default`."""
    if isinstance(value, bool):
        return default
    try:
        return operator.index(value)
    except TypeError:
        return default


def _stop_error(stop: object) -> str | None:
    """Why `stop` (SamplingParams.stop, a list already made a tuple) is no stop, or None when it is one.

    Anything else reached the detokenizer, and the request failed with an unclear "detokenization failed: TypeError"
    (or, an int, "invalid request: TypeError"); a None in a list was dropped without a word."""
    if stop is None or isinstance(stop, str):
        return None
    refused = "stop must be a string or a list of strings"
    if not isinstance(stop, tuple):
        return f"{refused}, got {type(stop).__name__}"
    wrong = [type(item).__name__ for item in stop if not isinstance(item, str)]
    return f"{refused}, got {wrong[0]} in the list" if wrong else None


def _token_ids(value: object, name: str) -> tuple[list[int], str | None]:
    """`value`, an iterable of whole numbers or None, as a new list of ints; else ([], why, naming it `name`)."""
    if value is None:
        return [], None
    refused = f"{name} must be a list of token ids (whole numbers)"
    # A string iterates as characters and bytes as small ints.
    if isinstance(value, (str, bytes, bytearray)):
        return [], f"{refused}, got {type(value).__name__}"
    try:
        items = list(value)
        # A bool is an int to Python, never a token id.
        if any(isinstance(item, bool) for item in items):
            raise TypeError("a bool is not a token id")
        return [operator.index(item) for item in items], None
    except Exception as exc:
        return [], f"{refused}: {type(exc).__name__}: {exc}"


def _output(seq: Sequence, delta: str, first_token: bool) -> SeqOutput:
    return SeqOutput(
        request_id=seq.request_id,
        delta=delta,
        text=seq.detokenizer.text if seq.detokenizer is not None else "",
        prompt_tokens=seq.prompt_len,
        completion_tokens=len(seq.output_token_ids),
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        error=seq.error,
        first_token=first_token,
        token_ids=list(seq.output_token_ids) if seq.is_finished else [],
        refused=seq.refused,
    )


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: the tokenizer's EOS and all of generation_config.eos_token_id."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos is not None:
        ids.update(generation_eos)
    return frozenset(ids)
