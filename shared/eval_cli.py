"""`llava-queue eval`: an original question file through a running llava-queue, answered as `model_vqa.py` does.

    llava-queue eval --question-file q.jsonl --image-folder imgs/ --answers-file a.jsonl --model NAME

`--script` takes another original script's command line, with its defaults: `model_vqa_loader` (what the official
benchmark scripts run: max_new_tokens 128, and `_mmtag` appended to a plain model's template), `model_vqa_science`
(ScienceQA: its question file is a JSON list, its answers echo the prompt with `<image>\n`, `--single-pred-prompt`)
or `model_vqa_mmbench` (MMBench: a TSV with the images in it, `--all-rounds`, `--single-pred-prompt`, `--lang`).

The images are on this machine: each question's image is read from `--image-folder`, sent as
base64 in a job built by `shared/vqa.py` (the same prompt as the original and as `POST
/v1/batches`), and the jobs go to `POST /v1/jobs/bulk` on the `batch` queue, a group at a time,
never more than `--max-in-flight` waiting at once. Each job is polled until it ends (up to 100 in one
`GET /v1/jobs?ids=`, a round of polls at most twice a second); its answer
line is appended to the answers file and flushed, as the original does. At the end the file is
rewritten in question-file order.

Beside the answers file `a.jsonl`:

* `a.jsonl.errors`: one JSON line per question that got no answer (bad line, unreadable image,
  failed job), with the reason; removed when there is none.
* `a.jsonl.params`: the sampling parameters the answers were made with (conv_mode, temperature,
  top_p, max_new_tokens, seed). A run with other ones (compared as the jobs are made: `answers_made_by`) stops
  before asking anything, rather than add answers of other parameters to those (`--overwrite` starts over). So do
  answers, or jobs in the queue, of another model than `--model` names (a run that names none takes any model's).
* `a.jsonl.lock`: held (flock) while a run writes these files, so a second run of the same command stops at once
  instead of asking every question again beside the first; removed at the end.
* `a.jsonl.jobs`: the jobs in the queue. A group is recorded there before it is posted (with its
  Idempotency-Key) and again with its job ids, so a run stopped at any point (Ctrl-C, a crash, a
  lost connection) is resumed by running the same command again: questions already in the
  answers file are skipped, jobs still known to the queue are collected instead of submitted
  again. Removed once no job is outstanding.

Exit status: 0 every question answered; 1 some failed (see the errors file); 2 the run could
not start or go on (bad arguments, API unreachable, refused); 130 interrupted.

No torch here: the command runs on client machines with the base install.
"""

import argparse
import csv
import fcntl
import http.client
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from shared.conversation import TemplateError
from shared.protocol import GREEDY_TEMPERATURE, check_images, context_overflowed, describe_validation_error
from shared.vqa import (DEFAULT_CONV_MODE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, LOADER_MAX_NEW_TOKENS,
                        SCIENCE_CONV_MODE, SINGLE_PRED_PROMPT, SINGLE_PRED_PROMPT_CN, EvalParams, MMBenchQuestion,
                        Question, answer_line, answer_matched, get_chunk, loader_conv_mode, mmbench_questions,
                        model_name_from_path, parse_question_line, question_job, question_prompt, read_image_b64,
                        science_question, stated_question_id)

DEFAULT_API_URL = "http://127.0.0.1:8000"
# Jobs per bulk POST, and base64 bytes per POST (the API's body limit is 64 MiB by default).
GROUP_SIZE = 128
GROUP_BYTES = 16 * 1024 * 1024
# How long a lost API (connection refused, 502-504) is waited for before the run stops.
PATIENCE_SECONDS = 300.0
# Jobs are polled in rounds, at most one every POLL_ROUND_SECONDS (the time between two polls of a running job): a
# round reads every job due in requests of up to POLL_PAGE jobs (`GET /v1/jobs?ids=`, the most it takes), POLL_THREADS
# at once. A request a job, 8 threads, was hundreds of requests a second, and used up a key's requests per minute
# (`RATE_LIMIT_PER_MINUTE`) within seconds.
POLL_ROUND_SECONDS = 0.5
POLL_PAGE = 100
POLL_THREADS = 8
FINAL_STATES = ("succeeded", "failed", "cancelled", "expired")


class Unreachable(Exception):
    """The API did not answer (connection refused, reset, timed out)."""


class Fatal(Exception):
    """The run cannot go on; the message says why."""


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) arrived while waiting."""


class PutOff(Exception):
    """A post the API put off (429: the queue is full, or the key's quota used up) for `delay` seconds."""

    def __init__(self, delay: float):
        super().__init__(delay)
        self.delay = delay


class Api:
    """A small JSON client for the llava-queue API (stdlib only), one keep-alive connection per thread."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--api-url {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port, self._prefix = parts.hostname, parts.port, parts.path.rstrip("/")
        self._timeout = timeout
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._local.conn = kind(self._host, self._port, timeout=self._timeout)
        return self._local.conn, False

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """One request; returns (status, headers, decoded JSON or text). Raises Unreachable."""
        payload = None if body is None else json.dumps(body).encode()
        sent = {**self._headers, **(headers or {})}
        if payload is not None:
            sent["Content-Type"] = "application/json"
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, self._prefix + path, body=payload, headers=sent)
                response = conn.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                # A kept-alive connection the server closed meanwhile: try once on a new one.
                if not reused:
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    raise Unreachable(f"cannot reach llava-queue at {self.url}: {reason}") from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode("utf-8", "replace")
        return response.status, {key.lower(): value for key, value in response.getheaders()}, data


def error_message(data: Any) -> str:
    """The message of an API error body (`{"error": {"message"}}`), or the body itself."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", data["error"]))
    return str(data)[:500]


def error_param(data: Any) -> str | None:
    """The `param` an API error body names (`{"error": {"param"}}`), if any."""
    return data["error"].get("param") if isinstance(data, dict) and isinstance(data.get("error"), dict) else None


def retry_after(headers: dict[str, str], default: float) -> float:
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return default


@dataclass
class Item:
    """One non-blank line of the question file (of this chunk).

    `repeat` counts the earlier lines of the chunk with the same question_id and text: the original answers every
    line, a line repeated as it is too.
    """

    line: int
    question: Question | None = None
    error: str | None = None
    repeat: int = 0
    # A bad line's own question_id, if it states one (`stated_question_id`), for its errors record.
    question_id: Any = None

    @property
    def key(self) -> tuple[str, str, int]:
        """What an answer is matched by: question_id, text (as its answer line's `prompt` echoes it, with its round_id
        for MMBench's: `Question.matched`) and repeat. A question_id is not unique: MME's file asks two questions of
        each image under the image's path. It is any JSON scalar: 1 and "1" are different ids."""
        return json.dumps(self.question.question_id), self.question.matched, self.repeat

    @property
    def place(self) -> tuple[int, int | None]:
        """Where the question is in the question file, as the jobs file names it: its line, and its round where a
        line is asked in rounds (`model_vqa_mmbench.py --all-rounds`)."""
        return self.line, self.question.round_id if isinstance(self.question, MMBenchQuestion) else None


def number_repeats(items: list[Item]) -> None:
    """Set each question's `repeat`: how many earlier items have its question_id and text."""
    seen: dict[tuple[str, str], int] = {}
    for item in items:
        if item.question is not None:
            question = (json.dumps(item.question.question_id), item.question.matched)
            item.repeat = seen.get(question, 0)
            seen[question] = item.repeat + 1


@dataclass
class Flight:
    """A job in the queue for one question."""

    item: Item
    job_id: str
    next_poll: float
    # The model it was submitted for (None: whichever serves it), which the jobs file says of it: a job an earlier run
    # submitted for none, collected by a run naming one, was recorded as that model's.
    model: str | None
    collected: bool = False  # submitted by an earlier run


@dataclass
class Group:
    """Questions posted together under one Idempotency-Key."""

    key: str
    items: list[Item]
    # The model its jobs are for: an earlier run's group is posted again for its model, the same body under its key.
    model: str | None
    # Not to be posted before this time.monotonic(): the API put its post off (429).
    not_before: float = 0.0
    # Its "before" line is in the jobs file.
    recorded: bool = False
    # The questions it was recorded (and maybe posted) with, when some of them can no longer be built (an image gone):
    # its key stays theirs (`_next_group`).
    first_items: list[Item] | None = None
    # Kept for later because a question of it could not be built (`_hold`); recorded so in the jobs file.
    held: bool = False


@dataclass
class Tally:
    """The counts the progress line and the summary show."""

    total: int = 0
    answered_before: int = 0
    answered: int = 0
    failed: int = 0
    submitted: int = 0
    collected: int = 0
    # Questions whose job ended (answered or failed): the time left is reckoned from these, not from bad lines that
    # fail at once (with them, the first line said "0:00:00 left").
    ended_jobs: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)


def answers_made_by(params: dict, model: bool = True) -> dict:
    """What of `params` (an `EvalParams` dump, as the `.params` and jobs files hold it) decides the answers, each in
    one form, so that two runs that would make the same jobs compare equal: no top_p is 1.0 (what the job gets);
    greedy (temperature at most GREEDY_TEMPERATURE) is temperature 0 with neither top_p nor seed, which it never
    reads; a conversation template is the prompt it makes of a question (`v1` and `vicuna_v1` are one template).
    Without `model`, the model is left out: no model is whichever serves the job, which only its answer names."""
    made = dict(params)
    if not model:
        made.pop("model", None)
    if made.get("top_p") is None:
        made["top_p"] = 1.0
    temperature = made.get("temperature")
    if isinstance(temperature, (int, float)) and temperature <= GREEDY_TEMPERATURE:
        made.update(temperature=0.0, top_p=None, seed=None)
    try:
        made["conv_mode"] = question_prompt("?", made.get("conv_mode"))
    except (TemplateError, TypeError):  # a file of another version naming a template this one does not know
        pass
    return made


def read_questions(path: Path) -> list[Item]:
    """Every non-blank line of the question file, parsed; a bad line is an Item with an error. A UTF-8 byte order
    mark (Windows editors write one) is skipped, as `POST /v1/batches` skips it."""
    items = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            item = Item(number)
            try:
                item.question = parse_question_line(raw.strip())
            except ValidationError as exc:
                item.error = f"bad question line: {describe_validation_error(exc).message}"
                item.question_id = stated_question_id(json_or_none(raw))
            items.append(item)
    return items


def read_science_questions(path: Path, single_pred_prompt: bool) -> list[Item]:
    """The questions of `model_vqa_science.py`'s file, a JSON list (`science_question`): an entry that is no question
    is an Item with an error, its `line` the entry's place in the list (from 1). ValueError when the file is no JSON
    list; a UTF-8 byte order mark is skipped, as `read_questions` skips it."""
    entries = json_or_none(path.read_bytes().removeprefix(b"\xef\xbb\xbf"))
    if not isinstance(entries, list):
        raise ValueError(f"the question file {path} is no JSON list (model_vqa_science.py reads one)")
    items = []
    for number, entry in enumerate(entries, start=1):
        item = Item(number)
        try:
            item.question = science_question(entry, single_pred_prompt)
        except ValidationError as exc:
            item.error = f"bad question: {describe_validation_error(exc).message}"
        except ValueError as exc:
            item.error = f"bad question: {exc}"
        if item.error:
            item.question_id = stated_question_id(entry, "id")
        items.append(item)
    return items


# The columns of `model_vqa_mmbench.py`'s TSV it cannot do without (it reads `hint` and the options A-D too).
MMBENCH_COLUMNS = ("index", "question", "image")


def read_mmbench_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of `model_vqa_mmbench.py`'s question file, a TSV with a header, read as the script reads it (pandas'
    `read_table`, with no pandas here): fields between tabs, a field in double quotes may hold tabs and line breaks,
    blank lines are skipped, a UTF-8 byte order mark too. Each row is the line it starts on and its fields by column
    (a field the row lacks is left out); its `index` is a number where the whole column is numbers, as pandas reads
    it, else the text. ValueError when the file is no such TSV."""
    # A field is as long as its image, base64: csv's limit of 128 KiB is less than many are.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t")
        try:
            header = next((fields for fields in reader if fields), [])
            start = reader.line_num + 1
            for fields in reader:
                if fields:
                    rows.append((start, dict(zip(header, fields))))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise ValueError(f"the question file {path} line {reader.line_num}: {exc}") from None
    missing = [name for name in MMBENCH_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"the question file {path} has no column {', '.join(missing)}: model_vqa_mmbench.py reads a "
                         "TSV of columns index, question, hint, A, B, C, D, image (base64)...")
    indexes = [row["index"] for _, row in rows if "index" in row]
    for pattern, kind in ((r"[+-]?\d+", int), (r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", float)):
        if all(re.fullmatch(pattern, index) for index in indexes):
            for _, row in rows:
                if "index" in row:
                    row["index"] = kind(row["index"])
            break
    return rows


def mmbench_items(rows: list[tuple[int, dict[str, Any]]], all_rounds: bool, instruction: str | None) -> list[Item]:
    """The questions of rows of `model_vqa_mmbench.py`'s file (`mmbench_questions`), each round an Item of the row's
    line; a row that is no question is an Item with an error."""
    items = []
    for line, row in rows:
        try:
            questions = mmbench_questions(row, row.get("index"), all_rounds, instruction)
        except ValidationError as exc:
            items.append(Item(line, error=f"bad question: {describe_validation_error(exc).message}",
                              question_id=stated_question_id(row, "index")))
            continue
        except ValueError as exc:
            items.append(Item(line, error=f"bad question: {exc}", question_id=stated_question_id(row, "index")))
            continue
        items.extend(Item(line, question) for question in questions)
    return items


def json_or_none(raw: bytes | str) -> Any:
    """The JSON value of a line, or None if it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # too deep a nesting raises the latter
        return None


def read_answers(path: Path) -> tuple[dict[tuple[str, str | None, int], str], bool]:
    """The answers file's lines by question key (`Item.key`, the prompt standing for the text), in file order, and
    whether an unfinished last line was dropped.

    A crash can leave the last line unfinished: it is dropped (its question is asked again).
    Any other line that is not an answer stops the run: the file is not ours to guess at.
    """
    if not path.exists():
        return {}, False
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    by_key: dict[tuple[str, str | None, int], str] = {}
    seen: dict[tuple[str, str | None], int] = {}

    def add(record: Any, raw: bytes) -> None:
        question = (json.dumps(record["question_id"]), answer_matched(record))
        repeat = seen.get(question, 0)
        seen[question] = repeat + 1
        by_key[(*question, repeat)] = raw.decode() + "\n"

    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            add(json.loads(raw), raw)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Fatal(f"{path} line {number} is not an answer line; fix or remove it "
                        "(or pass --overwrite to start over)") from None
    dropped = bool(tail.strip())
    if dropped:
        try:
            add(json.loads(tail), tail)
            dropped = False
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return by_key, dropped


def discards(path: Path) -> bool:
    """Whether `path` is the null device (`/dev/null`, or a link to it): written to, never replaced nor removed. A
    rename onto it, or an unlink, replaced or removed the system's /dev/null when the run had the rights (root)."""
    try:
        return os.path.samefile(path, os.devnull)
    except OSError:
        return False


def remove(path: Path) -> None:
    """Remove a file of the run, unless it is the null device."""
    if not discards(path):
        path.unlink(missing_ok=True)


def write_atomically(path: Path, lines: list[str]) -> None:
    """Replace `path` with `lines` at once (written aside, then renamed); nothing for the null device."""
    if discards(path):
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as file:
        file.writelines(lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Progress:
    """One status line on stderr: redrawn in place on a terminal, a line every `interval` seconds otherwise."""

    def __init__(self, tally: Tally, stream=None, interval: float | None = None):
        self.tally = tally
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self._last = 0.0
        self.note = ""

    def line(self) -> str:
        t = self.tally
        done = t.answered_before + t.answered + t.failed
        elapsed = max(1e-6, time.monotonic() - t.started)
        fraction = done / t.total if t.total else 1.0
        width = 24
        filled = int(fraction * width)
        bar = "█" * filled + "░" * (width - filled)
        left = "?"
        if done >= t.total:
            left = "0:00:00"
        elif t.ended_jobs:
            seconds = int((t.total - done) * elapsed / t.ended_jobs)
            left = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        text = (f"eval {done}/{t.total} |{bar}| {fraction:4.0%}  failed {t.failed}  "
                f"{t.tokens / elapsed:.1f} tok/s  {left} left")
        return f"{text}  ({self.note})" if self.note else text

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r\033[K{self.line()}")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own above the status line."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()
        if self.tty:
            self._last = 0.0
            self.update()

    def close(self) -> None:
        self.update(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class EvalRun:
    """One run over the questions of a chunk; `run()` returns the exit status."""

    def __init__(self, args: argparse.Namespace, api: Api, params: EvalParams, items: list[Item]):
        self.args, self.api, self.params, self.items = args, api, params, items
        self.answers_path = Path(args.answers_file)
        self.errors_path = Path(args.errors_file or f"{args.answers_file}.errors")
        self.state_path = Path(f"{args.answers_file}.jobs")
        self.params_path = Path(f"{args.answers_file}.params")
        self.lock_path = Path(f"{args.answers_file}.lock")
        self.image_folder = Path(args.image_folder)
        self.max_in_flight = args.max_in_flight
        self.group_size = max(1, min(GROUP_SIZE, self.max_in_flight // 2))
        self.fingerprint = {**params.model_dump(), "question_file": str(Path(args.question_file).resolve())}
        if args.script != "model_vqa_mmbench":
            # Not mmbench's, whose images are in its question file: --image-folder (by default the current folder) is
            # no part of its jobs, and a rerun from another folder asked again every question in the queue.
            self.fingerprint["image_folder"] = str(self.image_folder.resolve())
        # What else makes the prompts: jobs of a run without it (and so of other prompts) are not collected.
        self.prompt_options: dict[str, Any] = {}
        if args.single_pred_prompt:
            self.prompt_options["single_pred_prompt"] = True
            if args.script == "model_vqa_mmbench" and args.lang == "cn":
                self.prompt_options["lang"] = "cn"
        self.fingerprint.update(self.prompt_options)
        number_repeats(items)  # within the chunk: its answers file holds only the chunk's answers
        self.tally = Tally(total=len(items))
        self.progress = Progress(self.tally)
        self.stop = threading.Event()
        self.todo: deque[Item] = deque()
        self.resend: list[Group] = []
        self.flights: dict[str, Flight] = {}
        self.pending: dict[str, Group] = {}  # posted, ids not yet known (only while posting)
        self.held: list[Group] = []  # groups of an earlier run that can be collected only once their images are back
        self.answers: dict[tuple[str, str, int], str] = {}
        self.extra_answers: list[str] = []
        self.resubmitted: set[tuple[str, str, int]] = set()
        self.errors: list[dict] = []
        self.last_contact = time.monotonic()
        self.started_wall = time.time()
        self.next_round = 0.0  # no round of polls before this time.monotonic()
        self.one_by_one = False  # the API has no `GET /v1/jobs?ids=` (an older one): a request a job

    # Files.

    def _prepare_files(self) -> None:
        self.answers_path.parent.mkdir(parents=True, exist_ok=True)
        if self.args.overwrite:
            for path in (self.answers_path, self.errors_path, self.state_path, self.params_path):
                remove(path)
        by_key, dropped = read_answers(self.answers_path)
        questions = {item.key for item in self.items if item.question is not None}
        self._check_answers_model([line for key, line in by_key.items() if key in questions])
        self._check_params(bool(by_key))
        self._check_jobs_model()
        question_ids = {question_id for question_id, _, _ in questions}
        self.answers = {key: line for key, line in by_key.items() if key in questions}
        self.extra_answers = [line for key, line in by_key.items() if key[0] not in question_ids]
        if dropped:
            self.progress.message(f"eval: {self.answers_path}: dropped an unfinished last line (from a crash); "
                                  "its question is asked again")
        stale = len(by_key) - len(self.answers) - len(self.extra_answers)
        if stale:
            self.progress.message(f"eval: {stale} answers in {self.answers_path} have this file's question ids but "
                                  "another question's text (an earlier run of another file); those questions are "
                                  "asked again and their lines replaced")
        if self.answers_path.exists():
            self._rewrite_answers()  # clean, in order, ending in a newline before lines are appended
        if self.extra_answers:
            self.progress.message(f"eval: {len(self.extra_answers)} answers in {self.answers_path} are for questions "
                                  "not in this question file or chunk; they are kept at its end")
        self.answers_file = open(self.answers_path, "a")
        self.errors_file = open(self.errors_path, "w")
        self.state_file = None

    def _lock(self) -> Any:
        """Take the answers file's lock (`a.jsonl.lock`, holding the run's pid) and return it open; Fatal when another
        run holds it. Two runs of one command asked every question twice, and each rewrote the jobs file under the
        other. The kernel lets go of the lock of a run killed (kill -9), so a leftover file stops no one."""
        self.answers_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.lock_path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "?"
                file.close()
                raise Fatal(f"another llava-queue eval (pid {holder}) is writing {self.answers_path}: wait for it "
                            "to end, or stop it and run this command again") from None
            try:
                if os.path.samestat(os.fstat(file.fileno()), os.stat(self.lock_path)):
                    break
            except FileNotFoundError:
                pass
            file.close()  # a run that ended meanwhile removed the file this one locked: lock the file there now
        file.truncate(0)
        file.write(f"{os.getpid()}\n")
        file.flush()
        return file

    def _check_params(self, answered: bool) -> None:
        """Stop (Fatal) when the answers file holds answers made with other sampling parameters than this run's (its
        `.params` file says which); else record this run's. The answer lines are the original's, which name no
        parameters: without this, a rerun at another temperature kept the earlier answers as its own."""
        params = self.params.model_dump(exclude={"model"})
        if self.args.script == "model_vqa_mmbench":
            # Its answer lines do not echo the instruction a question ends in: an answer of another is told by this.
            params.update(self.prompt_options)
        if answered and self.params_path.exists():
            try:
                earlier = json.loads(self.params_path.read_text())
            except ValueError:
                earlier = None
            # Compared as the jobs are made: `--top_p 1.0` and no top_p were a mismatch, though they sample alike.
            made = answers_made_by(params)
            made_earlier = answers_made_by(earlier) if isinstance(earlier, dict) else None
            if made_earlier != made:
                differ = "unreadable" if made_earlier is None else \
                    ", ".join(f"{name} {earlier.get(name)!r} there, {params.get(name)!r} here"
                              for name in {**made_earlier, **made}
                              if made_earlier.get(name) != made.get(name) and earlier.get(name) != params.get(name))
                raise Fatal(f"the answers in {self.answers_path} were made with other parameters ({differ}; see "
                            f"{self.params_path}): pass --overwrite to start over, or write to another answers file")
        if not (answered and self.params_path.exists()):
            write_atomically(self.params_path, [json.dumps(params) + "\n"])

    def _check_answers_model(self, lines: list[str]) -> None:
        """Stop (Fatal) when answer lines of this run's questions (`lines`) are by another model than the run names, as
        jobs of another model stop it (`_check_jobs_model`) and answers of other parameters (`_check_params`). They
        were asked again and their lines replaced: a `--model` mistyped, or the answers file of another model's run,
        threw away that model's answers. A run that names no model takes any model's answers."""
        if self.params.model is None:
            return
        others = [model for line in lines if (model := json.loads(line).get("model_id")) != self.params.model]
        if others:
            names = sorted({repr(model) for model in others})
            go_on = f"run with --model {others[0]} to go on with them, or " if len(names) == 1 and \
                isinstance(others[0], str) else ""
            raise Fatal(f"{len(others)} answers in {self.answers_path} were made by model {', '.join(names)}, not "
                        f"{self.params.model!r}: {go_on}pass --overwrite to start over (or write to another answers "
                        "file)")

    def _rewrite_answers(self) -> None:
        """The answers in question-file order, then any others; replaces the file at once."""
        ordered = [self.answers[item.key] for item in self.items if item.question is not None
                   and item.key in self.answers]
        write_atomically(self.answers_path, ordered + self.extra_answers)

    def _state_append(self, record: dict) -> None:
        """One line of the jobs file, on disk before the run goes on (it is what makes a rerun safe)."""
        if self.state_file is None:
            self.state_file = open(self.state_path, "a")
        self.state_file.write(json.dumps(record) + "\n")
        self.state_file.flush()
        os.fsync(self.state_file.fileno())

    def _load_state(self, todo: dict[tuple[str, str, int], Item]) -> None:
        """Take over the jobs of an earlier run: collect those still known, post again groups never confirmed."""
        if not self.state_path.exists():
            return
        by_place = {item.place: item for item in todo.values()}
        by_id: dict[str, Item] = {}
        for item in todo.values():
            by_id.setdefault(item.key[0], item)

        def recorded(record: dict) -> list[Item | None]:
            """The questions a record names: by line, that line's question if it has the recorded question_id (a
            record without lines, by question_id)."""
            ids = [json.dumps(question_id) for question_id in record.get("question_ids", [])]
            if "lines" in record:
                rounds = record.get("rounds") or [None] * len(record["lines"])
                found = [by_place.get((line, round_id)) for line, round_id in zip(record["lines"], rounds)]
            else:
                found = [by_id.get(question_id) for question_id in ids]
            return [item if item is not None and item.key[0] == question_id else None
                    for item, question_id in zip(found, ids)]

        groups: dict[str, dict] = {}
        foreign = 0
        for raw in self.state_path.read_text().splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # a line cut short by a crash: its group is still in the "before" line
            if "params" in record:
                if not self._submitted_alike(record["params"]):
                    foreign += len(record.get("question_ids", []))
                    continue
                groups[record.get("key") or uuid.uuid4().hex] = record
            elif record.get("key") in groups:
                # The "after" line: the job ids, and the questions they are for when the group was posted with fewer
                # than it first held (`_next_group`).
                groups[record["key"]].update({name: record[name] for name in ("job_ids", "question_ids", "lines",
                                                                              "rounds") if name in record})
        if foreign:
            self.progress.message(f"eval: {jobs(foreign)} in {self.state_path} were submitted with other parameters; "
                                  "they are not collected")
        now = time.monotonic()
        for key, record in groups.items():
            items = recorded(record)
            job_ids = record.get("job_ids")
            model = record["params"].get("model")
            if job_ids is None:
                keys = [item.key for item in items if item is not None]
                if keys and len(keys) == len(set(keys)) == len(items) and all(k in todo for k in keys):
                    self.resend.append(Group(key, [todo.pop(k) for k in keys], model, recorded=True,
                                             held=record.get("held") is True))
                continue
            for item, job_id in zip(items, job_ids):
                if job_id and item is not None and item.key in todo:
                    self.flights[job_id] = Flight(todo.pop(item.key), job_id, now, model, collected=True)
        self._save_state()

    def _check_jobs_model(self) -> None:
        """Stop (Fatal) when the jobs file holds jobs submitted for another model than this run names. A run that
        names none takes any model's jobs, and a job submitted for none is this run's once it is answered by this
        run's model (`_ended`): compared as a parameter, `--model X` added or dropped on a rerun asked every question
        in the queue again."""
        if self.params.model is None or not self.state_path.exists():
            return
        for raw in self.state_path.read_text().splitlines():
            record = json_or_none(raw)
            params = record.get("params") if isinstance(record, dict) else None
            model = params.get("model") if isinstance(params, dict) else None
            if model is not None and model != self.params.model and self._submitted_alike(params):
                raise Fatal(f"the jobs in {self.state_path} were submitted for model {model!r}, not "
                            f"{self.params.model!r}: run with --model {model} to collect them, or pass --overwrite "
                            "to start over (or write to another answers file)")

    def _submitted_alike(self, params: Any) -> bool:
        """Whether a jobs-file record's `params` make the jobs this run makes, whichever model they were for."""
        if not isinstance(params, dict):
            return False
        if "image_folder" not in self.fingerprint:
            # The version before named it for mmbench too: its jobs are this run's wherever it was started.
            params = {name: value for name, value in params.items() if name != "image_folder"}
        return answers_made_by(params, model=False) == answers_made_by(self.fingerprint, model=False)

    def _save_state(self) -> None:
        """Replace the jobs file with what is outstanding now (or remove it when nothing is)."""
        if self.state_file is not None:
            self.state_file.close()
            self.state_file = None
        records = []
        for model in dict.fromkeys(flight.model for flight in self.flights.values()):
            flights = [flight for flight in self.flights.values() if flight.model == model]
            records.append({"key": uuid.uuid4().hex, "params": self._params_for(model),
                            **self._questions_of([flight.item for flight in flights]),
                            "job_ids": [f.job_id for f in flights]})
        for group in [*self.resend, *self.pending.values(), *self.held]:
            records.append({"key": group.key, "params": self._params_for(group.model),
                            **self._questions_of(group.first_items or group.items),
                            **({"held": True} if group.held else {})})
        if records:
            write_atomically(self.state_path, [json.dumps(record) + "\n" for record in records])
        else:
            remove(self.state_path)

    def _params_for(self, model: str | None) -> dict:
        """The jobs file's `params` of jobs submitted for `model`: this run's, but for the model."""
        return {**self.fingerprint, "model": model}

    @staticmethod
    def _questions_of(items: list[Item]) -> dict[str, list]:
        """How a jobs-file record names its questions: question_ids, and lines (a question_id may repeat), and rounds
        (of a line asked in several: `Item.place`)."""
        named = {"question_ids": [item.question.question_id for item in items], "lines": [item.line for item in items]}
        if any(item.place[1] is not None for item in items):
            named["rounds"] = [item.place[1] for item in items]
        return named

    def _fail(self, item: Item, error: str, job_id: str | None = None) -> None:
        record = {"question_id": item.question.question_id if item.question else item.question_id, "line": item.line,
                  "error": error}
        if job_id:
            record["job_id"] = job_id
            self.tally.ended_jobs += 1
        self.errors_file.write(json.dumps(record) + "\n")
        self.errors_file.flush()
        self.errors.append(record)
        self.tally.failed += 1

    def _answer(self, item: Item, job: dict) -> None:
        line = answer_line(item.question.answer_record(job["text"], job["model"]))
        self.answers_file.write(line)
        self.answers_file.flush()
        self.answers[item.key] = line
        self.tally.answered += 1
        self.tally.ended_jobs += 1
        if (job.get("finished_at") or 0) >= self.started_wall:
            self.tally.tokens += job["usage"]["completion_tokens"]

    # Submitting.

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Stopped

    def _job_of(self, item: Item, model: str | None) -> dict | None:
        """The JSON job for a question, for `model`; None (and an error line) when it cannot be built."""
        image = None
        name = item.question.image
        if isinstance(item.question, MMBenchQuestion):
            image = item.question.image_b64
            try:
                check_images([image])
            except ValueError as exc:
                self._fail(item, f"the image in the question file {str(exc).removeprefix('image 0 ')}")
                return None
        elif name is not None:
            try:
                image = read_image_b64(self.image_folder, name)
            except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
                self._fail(item, f"cannot read image {name!r} in {self.image_folder}: "
                                 f"{getattr(exc, 'strerror', None) or exc}")
                return None
            try:
                check_images([image])
            except ValueError as exc:
                self._fail(item, f"image {name!r} {str(exc).removeprefix('image 0 ')}")
                return None
        try:
            job = question_job(item.question, self.params.model_copy(update={"model": model}), image)
        except ValidationError as exc:  # e.g. a question that fits its own limit but not, templated, a job's
            self._fail(item, f"bad question: {describe_validation_error(exc).message}")
            return None
        return job.model_dump(mode="json", exclude_none=True)

    def _next_group(self) -> tuple[Group, list[dict]] | None:
        """The next questions to post and their jobs: a group of an earlier run first, else new ones that fit."""
        if self.resend:
            if self.resend[0].not_before > time.monotonic():
                return None  # the queue was full: nothing new is posted before it either
            group = self.resend.pop(0)
            built = [(item, job) for item in group.items if (job := self._job_of(item, group.model)) is not None]
            if len(built) != len(group.items):
                first_items = group.first_items or group.items
                asked = [item for item, _ in built]
                if group.held:
                    # Kept by the last run for an image that is still gone: gone for good, as far as a run can tell.
                    # Kept again, its questions failed on every rerun until --overwrite; they are asked anew instead,
                    # under a new key (its jobs cannot be collected without the image).
                    gone = ", ".join(str(item.line) for item in first_items if item not in asked)
                    again = f", line(s) {', '.join(str(item.line) for item in asked)} asked again" if asked else ""
                    self.progress.message(f"eval: the image of line(s) {gone} is still missing: the jobs an earlier "
                                          f"run posted with it (and lost the ids of) are given up{again}")
                    return Group(uuid.uuid4().hex, asked, group.model), [job for _, job in built]
                # A question of the group cannot be built now (its image is gone). The rest go under the group's key
                # all the same: if the group was posted before, the API refuses (422) the key with another body, and
                # makes no jobs again (under a new key, it asked those questions twice); if not, it takes them.
                group = Group(group.key, asked, group.model, recorded=True, first_items=first_items)
                if not built:
                    self.held.append(Group(group.key, first_items, group.model, recorded=True, held=True))
            return group, [job for _, job in built]
        room = self.max_in_flight - len(self.flights)
        if not self.todo or room < min(self.group_size, len(self.todo)):
            return None
        items, jobs, size = [], [], 0
        while self.todo and len(jobs) < min(self.group_size, room) and size < GROUP_BYTES:
            item = self.todo.popleft()
            job = self._job_of(item, self.params.model)
            if job is not None:
                items.append(item)
                jobs.append(job)
                size += sum(map(len, job.get("images", [])))
        return Group(uuid.uuid4().hex, items, self.params.model), jobs

    def _post(self, path: str, body: dict, key: str, put_off: bool = False) -> tuple[int, Any]:
        """POST with the Idempotency-Key, waiting out 429 (Retry-After) and a lost API (up to PATIENCE_SECONDS).
        With `put_off`, a 429 raises PutOff instead, so that the run follows its jobs meanwhile (a Retry-After may
        be an hour)."""
        lost_since = None
        backoff = 1.0
        while True:
            try:
                status, headers, data = self.api.request("POST", path, body, {"Idempotency-Key": key})
            except Unreachable as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > PATIENCE_SECONDS:
                    raise Fatal(str(exc)) from None
                self.progress.note = f"{exc}; retrying"
                self.progress.update()
                self._wait(backoff)
                backoff = min(10.0, backoff * 2)
                continue
            if status == 429 or status in (502, 503, 504):
                if status == 429:
                    lost_since = None
                    self.last_contact = time.monotonic()
                else:  # the API (or what is behind it) is away: as long as an unreachable one
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > PATIENCE_SECONDS:
                        raise Fatal(f"POST {path} answered {status}: {error_message(data)}")
                delay = retry_after(headers, backoff)
                self.progress.note = f"{error_message(data)}; retrying in {delay:.0f} s"
                self.progress.update(force=True)
                if status == 429 and put_off:
                    raise PutOff(delay)
                self._wait(delay)
                backoff = min(10.0, backoff * 2)
                continue
            self.progress.note = ""
            return status, data

    def _submit(self, group: Group, jobs: list[dict]) -> None:
        """Post a group's jobs under its Idempotency-Key, recorded in the jobs file before and after."""
        self.pending[group.key] = group
        if not group.recorded:
            self._state_append({"key": group.key, "params": self._params_for(group.model),
                                **self._questions_of(group.items)})
            group.recorded = True
        try:
            status, data = self._post("/v1/jobs/bulk", {"jobs": jobs}, group.key, put_off=True)
        except PutOff as exc:
            # Posted again under its key once the delay has passed; its jobs are followed meanwhile.
            del self.pending[group.key]
            group.not_before = time.monotonic() + exc.delay
            self.resend.insert(0, group)
            return
        if status == 202:
            job_ids = data["ids"]
        elif status == 422 and group.first_items is not None and error_param(data) == "header.idempotency-key":
            self._hold(group)
            return
        elif status in (400, 413, 422):
            # Something only the server refuses (its limits may differ from ours): post one by one to find it. A 400
            # is a group larger than the server's queue limit or the key's quota, a 413 one larger than the bodies
            # it (or a proxy in front of it) takes: one by one, each job fits, or fails alone.
            job_ids = self._post_one_by_one(group, jobs)
        else:
            raise Fatal(f"POST /v1/jobs/bulk answered {status}: {error_message(data)}")
        # A group posted with fewer questions than recorded names those its ids are for.
        self._state_append({"key": group.key, "job_ids": job_ids,
                            **(self._questions_of(group.items) if group.first_items is not None else {})})
        del self.pending[group.key]
        now = time.monotonic()
        for item, job_id in zip(group.items, job_ids):
            if job_id is not None:
                self.flights[job_id] = Flight(item, job_id, now + 0.3, group.model)
                self.tally.submitted += 1
        self.last_contact = time.monotonic()

    def _hold(self, group: Group) -> None:
        """Keep a group that an earlier run posted and whose ids it lost, now that a question of it cannot be built:
        its questions fail, saying so, and the jobs file keeps the group, collected once its images are back."""
        del self.pending[group.key]
        self.held.append(Group(group.key, group.first_items, group.model, recorded=True, held=True))
        gone = ", ".join(str(item.line) for item in group.first_items if item not in group.items)
        for item in group.items:
            self._fail(item, f"asked by an earlier run that stopped before it wrote the job ids down; the answer is "
                             f"collected by posting its group again as it was, and the image of its line(s) {gone} "
                             "cannot be read now: put it back and run the same command again (run again without "
                             "it, the question is asked anew)")

    def _post_one_by_one(self, group: Group, jobs: list[dict]) -> list[str | None]:
        """Post a group's jobs each on its own (key: the group's and the index); the ids of those posted, in order
        (None: refused). When the API puts one off (429), the rest of the group waits out the delay as a group of its
        own, with a new key, while the run follows its jobs: the post waited out a Retry-After of up to an hour, and
        saw neither the jobs in the queue end nor the API go away meanwhile."""
        job_ids: list[str | None] = []
        # Each job's key is its place in the group as first recorded: the same whatever questions fail locally since.
        places = {id(item): place for place, item in enumerate(group.first_items or group.items)}
        for index, (item, job) in enumerate(zip(group.items, jobs)):
            try:
                status, data = self._post("/v1/jobs", job, f"{group.key}.{places[id(item)]}", put_off=True)
            except PutOff as exc:
                rest = Group(uuid.uuid4().hex, group.items[index:], group.model,
                             not_before=time.monotonic() + exc.delay)
                self.resend.insert(0, rest)
                break
            if status == 202:
                job_ids.append(data["id"])
            elif status in (400, 413, 422):
                job_ids.append(None)
                self._fail(item, f"refused by the API: {error_message(data)}")
            else:
                raise Fatal(f"POST /v1/jobs answered {status}: {error_message(data)}")
        return job_ids

    def _fill(self) -> None:
        while not self.stop.is_set():
            following = self._next_group()
            if following is None:
                return
            if following[1]:
                self._submit(*following)
            self.progress.update()

    # Following.

    def _read(self, flights: list[Flight], one_by_one: bool) -> tuple[int, dict[str, str], Any] | Unreachable:
        """The jobs of `flights` in one request (`GET /v1/jobs?ids=`): (status, headers, the list, whose `data` leaves
        out the jobs unknown to the API), or Unreachable. `one_by_one` (an API older than `ids`): the one job of
        `flights` by its own GET."""
        try:
            if not one_by_one:
                return self.api.request("GET", f"/v1/jobs?ids={','.join(f.job_id for f in flights)}")
            [flight] = flights
            status, headers, data = self.api.request("GET", f"/v1/jobs/{flight.job_id}")
            if status in (200, 404):
                return 200, headers, {"data": [data] if status == 200 else [], "has_more": False}
            return status, headers, data
        except Unreachable as exc:
            return exc

    @staticmethod
    def _older_api(status: int, data: Any, flights: list[Flight]) -> bool:
        """Whether an answer to `GET /v1/jobs?ids=` is an older API's, which has no `ids`: 405 (no list at all), or
        a page of its newest jobs (`ids` ignored), which would leave out jobs that are there."""
        if status == 405:
            return True
        if status != 200:
            return False
        asked = {flight.job_id for flight in flights}
        return bool(data.get("has_more")) or any(job.get("id") not in asked for job in data.get("data", []))

    def _next_poll(self, job: dict) -> float:
        """When to look at a job again: soon while it runs, later the further back in the queue it waits."""
        now = time.monotonic()
        if job["status"] != "queued":
            return now + 0.5
        finished = self.tally.ended_jobs
        rate = finished / max(1e-6, now - self.tally.started) if finished else 1.0
        ahead = job.get("queue_position") or 0
        return now + min(10.0, max(0.5, ahead / rate))

    def _poll(self, pool: ThreadPoolExecutor) -> None:
        """A round of polls: every job due, unless the last round was less than POLL_ROUND_SECONDS ago."""
        now = time.monotonic()
        due = [flight for flight in self.flights.values() if flight.next_poll <= now]
        if not due or now < self.next_round:
            return
        self.next_round = now + POLL_ROUND_SECONDS
        # Every page of the round is read, and its answer judged, as the round began: a page asked with `ids` and
        # answered after the first showed an older API was taken for the ids answer, its jobs left out for gone.
        one_by_one = self.one_by_one
        page_size = 1 if one_by_one else POLL_PAGE
        pages = [due[start:start + page_size] for start in range(0, len(due), page_size)]
        lost = None
        for page, result in zip(pages, pool.map(self._read, pages, [one_by_one] * len(pages))):
            if isinstance(result, Unreachable):
                lost = str(result)
                for flight in page:
                    flight.next_poll = now + 2.0
                continue
            status, headers, data = result
            if not one_by_one and self._older_api(status, data, page):
                if not self.one_by_one:
                    self.progress.message(f"eval: {self.api.url} has no GET /v1/jobs?ids= (an older llava-queue): "
                                          "each job is polled on its own")
                self.one_by_one = True  # its jobs are polled again at the next round, each on its own
            elif status == 200:
                self.last_contact = time.monotonic()
                found = {job["id"]: job for job in data["data"]}
                for flight in page:
                    job = found.get(flight.job_id)
                    if job is None or job["status"] in FINAL_STATES:
                        self._ended(flight, job)  # (None: unknown to the API, a 404 of its own GET)
                    else:
                        flight.next_poll = self._next_poll(job)
            elif status in (429, 502, 503, 504):
                delay = retry_after(headers, 2.0)
                for flight in page:
                    flight.next_poll = now + delay
                if status == 429:
                    # No poll before then: each would be refused, and count against the limit all the same.
                    self.next_round = max(self.next_round, now + delay)
                    self.last_contact = time.monotonic()
                else:
                    lost = f"GET /v1/jobs answered {status}: {error_message(data)}"
            else:
                raise Fatal(f"GET /v1/jobs answered {status}: {error_message(data)}")
        if lost is not None and time.monotonic() - self.last_contact > PATIENCE_SECONDS:
            raise Fatal(lost)

    def _ended(self, flight: Flight, job: dict | None) -> None:
        del self.flights[flight.job_id]
        item = flight.item
        if job is not None and job["status"] == "succeeded" and self.params.model not in (None, job["model"]):
            # A job an earlier run submitted for no model, answered by another than this run names: not its answer.
            self.progress.message(f"eval: job {flight.job_id} of an earlier run was answered by {job['model']!r}, "
                                  f"not {self.params.model!r}: its question is asked again")
            self.todo.appendleft(item)
            return
        if job is not None and job["status"] == "succeeded":
            if context_overflowed(job["text"], job["usage"]["completion_tokens"]):
                self._fail(item, f"the question does not fit the model's context "
                                 f"({job['usage']['prompt_tokens']} prompt tokens)", flight.job_id)
            else:
                self._answer(item, job)
                self.tally.collected += flight.collected
            return
        if (flight.collected or job is None) and item.key not in self.resubmitted:
            # A job of an earlier run that did not answer (or whose record expired), or one whose record is gone (a
            # Redis restarted without its data): ask again, once. Those of a lost Redis all failed, "expired?".
            self.resubmitted.add(item.key)
            self.todo.appendleft(item)
            return
        if job is None:
            self._fail(item, f"job {flight.job_id} is unknown to the API (its record expired, or its Redis lost "
                             "it), and so was the question's job before it", flight.job_id)
        else:
            reason = job.get("error") or f"the job ended {job['status']}"
            self._fail(item, f"job {job['status']}: {reason} (error_code {job['error_code']})", flight.job_id)

    # The run.

    def _on_signal(self, signum, _frame) -> None:
        # Not self.stop.set() here: the handler runs on the main thread, which may be inside stop.wait() holding
        # the event's lock, and set() would wait for that lock for ever. A thread of its own takes it once the main
        # thread's wait lets go of it.
        threading.Thread(target=self.stop.set, name="eval-stop").start()
        # A second Ctrl-C stops at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def run(self) -> int:
        """Answer the questions not answered yet; the exit status. The answers file's lock is held throughout."""
        lock = self._lock()
        try:
            return self._run()
        finally:
            remove(self.lock_path)
            lock.close()

    def _run(self) -> int:
        self._prepare_files()
        todo: dict[tuple[str, str, int], Item] = {}
        for item in self.items:
            if item.question is None:
                self._fail(item, item.error)
            elif item.key in self.answers:
                self.tally.answered_before += 1
            else:
                todo[item.key] = item
        self._load_state(todo)
        self.todo = deque(todo.values())
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if main_thread:
            previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        fatal = None
        try:
            with ThreadPoolExecutor(POLL_THREADS, thread_name_prefix="eval-poll") as pool:
                while (self.todo or self.resend or self.flights) and not self.stop.is_set():
                    self._fill()
                    self._poll(pool)
                    self.progress.update()
                    waits = [group.not_before for group in self.resend[:1]]
                    if self.flights:  # the next round of polls: when a job is due, and not before `next_round`
                        waits.append(max(self.next_round, min(f.next_poll for f in self.flights.values())))
                    upcoming = min(waits, default=time.monotonic() + 0.05)
                    self.stop.wait(min(0.5, max(0.02, upcoming - time.monotonic())))
        except Stopped:
            pass
        except Fatal as exc:
            fatal = str(exc)
        finally:
            try:
                self.progress.close()
                self.answers_file.close()
                self._rewrite_answers()
                self._save_state()
                if self.state_file is not None:
                    self.state_file.close()
                self.errors_file.close()
                if self.errors:
                    self.errors.sort(key=lambda record: record["line"])
                    write_atomically(self.errors_path, [json.dumps(record) + "\n" for record in self.errors])
                else:
                    remove(self.errors_path)
            finally:
                # Only once the files are written: a SIGTERM meanwhile, with its default handler back, killed the run
                # there (status 143, the answers left in the order they came, the jobs file not brought up to date).
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
        return self._report(fatal)

    def _report(self, fatal: str | None) -> int:
        t = self.tally
        answered = t.answered_before + t.answered
        posting = sum(len(group.items) for group in [*self.resend, *self.pending.values()])
        if fatal or self.flights or posting or self.todo:
            why = f"stopped: {fatal}" if fatal else "interrupted"
            kept = [f"{jobs(len(self.flights))} still in the queue"] if self.flights else []
            kept += [f"{posting} being posted"] if posting else []
            print(f"eval: {why}. {answered} of {t.total} answered in {self.answers_path}"
                  + (f", {' and '.join(kept)} (recorded in {self.state_path})" if kept else "")
                  + ". Run the same command again to " + ("collect them and " if kept else "") + "answer the rest.",
                  file=sys.stderr)
            return 2 if fatal else 130
        elapsed = time.monotonic() - t.started
        failed = f"{t.failed} failed (see {self.errors_path})" if t.failed else "0 failed"
        print(f"eval: {t.total} questions: {answered} answered ({t.answered_before} before this run), {failed}; "
              f"this run: {jobs(t.submitted)} submitted, {t.collected} collected from an earlier run, "
              f"{t.tokens} tokens in {elapsed:.1f} s ({t.tokens / max(elapsed, 1e-6):.1f} tokens/s); "
              f"answers in {self.answers_path}")
        return 1 if t.failed else 0


def jobs(count: int) -> str:
    """A count of jobs as a summary line says it: "1 job", "2 jobs"."""
    return f"{count} job{'' if count == 1 else 's'}"


def served_models(api: Api) -> list[str]:
    """The models live workers serve (`GET /v1/models`); raises Fatal when the API cannot be used.

    As every later call: a 429 (the key's requests per minute, used up by a run just stopped) is waited out for its
    Retry-After, and 502-504 (the API's Redis away) for up to PATIENCE_SECONDS.
    """
    asked_since = time.monotonic()
    while True:
        try:
            status, headers, data = api.request("GET", "/v1/models")
        except Unreachable as exc:
            raise Fatal(f"{exc} (is it running? start it with `llava-queue up`, or give --api-url or "
                        "LLAVA_QUEUE_API_URL)") from None
        if status != 429 and (status not in (502, 503, 504) or time.monotonic() - asked_since > PATIENCE_SECONDS):
            break
        delay = retry_after(headers, 2.0)
        print(f"llava-queue eval: GET /v1/models answered {status}: {error_message(data)}; retrying in {delay:.0f} s",
              file=sys.stderr)
        time.sleep(delay)
    if status in (502, 503, 504):
        raise Fatal(f"{api.url} answered {status} for {PATIENCE_SECONDS:.0f} s: {error_message(data)}")
    if status == 401:
        raise Fatal(f"{api.url} wants an API key: give --api-key or LLAVA_QUEUE_API_KEY ({error_message(data)})")
    if status != 200 or not isinstance(data, dict):
        raise Fatal(f"{api.url} does not look like llava-queue: GET /v1/models answered {status}: "
                    f"{error_message(data)}")
    return [model["id"] for model in data.get("data", [])]


def cmd_eval(args: argparse.Namespace) -> int:
    """`llava-queue eval`: see the module docstring."""
    def refuse(message: str) -> int:
        print(f"llava-queue eval: {message}", file=sys.stderr)
        return 2

    # As model_vqa.py: "~" in the question and answers files' paths is the home folder (a quoted path keeps it).
    args.question_file, args.answers_file = map(os.path.expanduser, (args.question_file, args.answers_file))
    model = args.model or (model_name_from_path(args.model_path) if args.model_path else None)
    loader, science = args.script == "model_vqa_loader", args.script == "model_vqa_science"
    mmbench = args.script == "model_vqa_mmbench"
    if args.single_pred_prompt and not (science or mmbench):
        return refuse("--single-pred-prompt is model_vqa_science.py's and model_vqa_mmbench.py's: give --script "
                      "model_vqa_science or model_vqa_mmbench")
    for flag, given in (("--all-rounds", args.all_rounds), ("--lang", args.lang is not None)):
        if given and not mmbench:
            return refuse(f"{flag} is model_vqa_mmbench.py's: give --script model_vqa_mmbench")
    if args.answer_prompter and not science:
        return refuse("--answer-prompter is model_vqa_science.py's: give --script model_vqa_science")
    conv_mode = (SCIENCE_CONV_MODE if science else DEFAULT_CONV_MODE) if args.conv_mode is None else args.conv_mode
    switched = None
    # Both switch a plain model's template alike.
    switches = loader or mmbench
    if switches and model is not None and loader_conv_mode(conv_mode, model) != conv_mode:
        switched = f"{args.script}.py appends _mmtag to --conv-mode {conv_mode} for the plain model {model!r}"
        conv_mode = loader_conv_mode(conv_mode, model)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = LOADER_MAX_NEW_TOKENS if loader else DEFAULT_MAX_NEW_TOKENS
    try:
        params = EvalParams(model=model, conv_mode=conv_mode, temperature=args.temperature, top_p=args.top_p,
                            num_beams=args.num_beams, max_new_tokens=max_new_tokens, seed=args.seed)
    except ValidationError as exc:
        # Such as llava_v1_mmtag, which is no template: the original fails on it too (a KeyError).
        return refuse(describe_validation_error(exc).message + (f" ({switched})" if switched else ""))
    if switched:
        print(f"llava-queue eval: {switched}: asking with {conv_mode}", file=sys.stderr)
    if args.max_in_flight < 1:
        return refuse("--max-in-flight must be at least 1")
    try:
        if mmbench:
            entries = read_mmbench_rows(Path(args.question_file))
        elif science:
            entries = read_science_questions(Path(args.question_file), args.single_pred_prompt)
        else:
            entries = read_questions(Path(args.question_file))
        if not entries:
            return refuse(f"the question file {args.question_file} holds no questions")
        entries = get_chunk(entries, args.num_chunks, args.chunk_idx)
        # model_vqa_mmbench.py splits its table by rows: a row's rounds are asked in its chunk.
        items = mmbench_items(entries, args.all_rounds, (SINGLE_PRED_PROMPT_CN if args.lang == "cn" else
                                                         SINGLE_PRED_PROMPT) if args.single_pred_prompt else None) \
            if mmbench else entries
    except OSError as exc:
        return refuse(f"cannot read the question file {args.question_file}: {exc.strerror or exc}")
    except ValueError as exc:
        return refuse(str(exc))
    if any(item.question and item.question.image for item in items) and not Path(args.image_folder).is_dir():
        return refuse(f"the image folder {args.image_folder} is not a folder")
    for what, path in (("answers", args.answers_file), ("errors", args.errors_file or f"{args.answers_file}.errors")):
        # The answers file is read back to go on after a stop: /dev/full read for ever (17 GB of "answers" before the
        # kernel killed the run), a pipe such as /dev/stdout hung.
        if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path) or
                                         os.path.samefile(path, os.devnull)):
            return refuse(f"the {what} file {path} is not a regular file (it is read back to go on after a stop)")
    try:
        api = Api(args.api_url, args.api_key)
        served = served_models(api)
    except (ValueError, Fatal) as exc:
        return refuse(str(exc))
    except KeyboardInterrupt:
        print("llava-queue eval: interrupted before any question was sent", file=sys.stderr)
        return 130
    if model is not None and served and model not in served:
        return refuse(f"model {model!r} is not served at {api.url} (served: {', '.join(served)})")
    if switches and model is None and (plain := [name for name in served if loader_conv_mode(conv_mode, name)
                                                  != conv_mode]):
        # Which worker takes a job decides its model, and so the template the original would give it.
        return refuse(f"{args.script}.py gives a plain model such as {plain[0]!r} (served at {api.url}) another "
                      "--conv-mode: name the model to ask with --model-path or --model")
    if not served:
        print(f"llava-queue eval: no worker serves a model at {api.url} now; the jobs wait in the queue until one "
              "does", file=sys.stderr)
    try:
        return EvalRun(args, api, params, items).run()
    except Fatal as exc:
        return refuse(str(exc))
    except OSError as exc:  # the answers, errors or jobs file cannot be written (a wrong path, a full disk)
        return refuse(f"cannot go on: {exc}")
    except KeyboardInterrupt:
        print("llava-queue eval: stopped at once; run the same command again to go on", file=sys.stderr)
        return 130


# The original scripts whose command line `eval` takes (`--script`), the first its default.
SCRIPTS = ("model_vqa", "model_vqa_loader", "model_vqa_science", "model_vqa_mmbench")


def script_name(value: str) -> str:
    """`--script`: an original evaluation script, by the name `python -m llava.eval.NAME` runs it under (its module
    or file path is taken too)."""
    name = value.removeprefix("llava.eval.").removeprefix("llava/eval/").removesuffix(".py")
    if name not in SCRIPTS:
        raise argparse.ArgumentTypeError(f"{value!r} is none of {', '.join(SCRIPTS)}")
    return name


def add_eval_parser(sub) -> None:
    """Register `eval` (with the original `model_vqa.py` flags) on the `llava-queue` subparsers."""
    parser = sub.add_parser(
        "eval", help="answer an original LLaVA question file through a running llava-queue",
        description="Answer a model_vqa.py question file through the llava-queue at --api-url; resumable "
                    "(run it again after a crash or Ctrl-C: answered questions are skipped, jobs still in the "
                    "queue are collected).")
    parser.add_argument("--script", type=script_name, default=SCRIPTS[0],
                        help="the original script whose command line this is: `python -m llava.eval.NAME` becomes "
                             "`llava-queue eval --script NAME`. model_vqa (the default); model_vqa_loader, which "
                             "the official benchmark scripts run (max_new_tokens 128; a plain model's --conv-mode "
                             "gets _mmtag); model_vqa_science (ScienceQA: a JSON list of {id, conversations[, "
                             "image]}; --conv-mode llava_v0); model_vqa_mmbench (MMBench: a TSV of columns index, "
                             "question, hint, A-D, image in base64; a plain model's --conv-mode gets _mmtag)")
    parser.add_argument("--question-file", required=True,
                        help="JSON lines {question_id, image, text[, category]} (see --script model_vqa_science "
                             "and model_vqa_mmbench)")
    parser.add_argument("--image-folder", default="", help="where the questions' image files are (on this machine)")
    parser.add_argument("--answers-file", required=True, help="JSON lines, as model_vqa.py writes them")
    parser.add_argument("--model", help="the served model to ask (default: whichever worker takes the job)")
    parser.add_argument("--model-path", help="as in model_vqa.py: names the model by its last path part "
                                             "(what the worker serving it reports); --model wins")
    parser.add_argument("--model-base", help="accepted for the original command lines and ignored: the worker "
                                             "loads the base (LLAVA_QUEUE_MODEL_BASE)")
    parser.add_argument("--conv-mode", help=f"conversation template (default {DEFAULT_CONV_MODE}; "
                                             f"{SCIENCE_CONV_MODE} with --script model_vqa_science)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="0 is greedy (default %(default)s, as model_vqa.py)")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1,
                        help="1 only (llava-queue decodes one beam)")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                        help=f"default {DEFAULT_MAX_NEW_TOKENS}, as model_vqa.py hard-codes "
                             f"({LOADER_MAX_NEW_TOKENS} with --script model_vqa_loader, its default)")
    parser.add_argument("--seed", type=int, default=None, help="every job samples with this seed")
    parser.add_argument("--single-pred-prompt", action="store_true",
                        help="model_vqa_science's and model_vqa_mmbench's: each question ends in \"Answer with the "
                             "option's letter from the given choices directly.\"")
    parser.add_argument("--answer-prompter", action="store_true",
                        help="model_vqa_science's, taken as it takes it: it reads it nowhere")
    parser.add_argument("--all-rounds", action="store_true",
                        help="model_vqa_mmbench's: ask each question once per option, the options turned one "
                             "further each round (answer lines' round_id)")
    parser.add_argument("--lang", choices=("en", "cn"),
                        help="model_vqa_mmbench's: cn ends each question (with --single-pred-prompt) in Chinese "
                             "(MMBench-CN; default en)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions as model_vqa.py does...")
    parser.add_argument("--chunk-idx", type=int, default=0, help="...and answer this chunk (from 0)")
    parser.add_argument("--api-url", default=os.environ.get("LLAVA_QUEUE_API_URL", DEFAULT_API_URL),
                        help="default LLAVA_QUEUE_API_URL, else %(default)s")
    parser.add_argument("--api-key", default=os.environ.get("LLAVA_QUEUE_API_KEY"),
                        help="sent as 'Authorization: Bearer'; default LLAVA_QUEUE_API_KEY")
    parser.add_argument("--errors-file", help="default: the answers file + '.errors'")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="at most this many jobs in the queue at once (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: remove the answers, errors and jobs files of an earlier run")
    parser.set_defaults(func=cmd_eval)
