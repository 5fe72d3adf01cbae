"""Batches of offline evaluation in Redis: a batch record, its lines in file order, and their results.

A batch is a hash (status, timestamps, counters), a list with one JSON entry per input line in
file order (the line's job id and what its output line needs: `question_id` and question text,
or `custom_id`; or why the line was refused when it was read), and a hash of results by line
number. Each line that parses becomes a job on the `batch` queue whose record names the batch
and the line; when such a job ends, the job store's finish script (shared/jobs.py `_FINISH`)
copies its result into the batch, counts it, and ends the batch with its last line. So a batch
needs no process watching it, results outlive job records, and any API replica can answer.

Statuses (OpenAI's): validating → in_progress → finalizing → completed; failed (no line could
be read); cancelling → cancelled; expired (lines still queued when the completion window passed).
Output files are assembled from the lines and results when they are read; deleting one (DELETE /v1/files/{id})
drops the results it shows and its lines' job records, and marks it deleted (`output_deleted_at`, `errors_deleted_at`).
"""

import itertools
import json
import math
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from redis.client import NEVER_DECODE

from shared.jobs import (AFTER_CURSOR_LUA, BATCH_END_LUA, CANCELLED_ERROR, QUEUES, DamagedRecord, JobStore,
                         glob_escaped, owner_id, wrong_type)
from shared.protocol import ErrorCode
from shared.vqa import _SHORTUUID_ALPHABET, _SHORTUUID_LENGTH

FINAL_STATUSES = ("completed", "failed", "cancelled", "expired")
_STATUSES = ("validating", "in_progress", "finalizing", "cancelling", *FINAL_STATUSES)
_TIMESTAMPS = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "cancelling_at", "cancelled_at", "expires_at", "last_finished_at")
_COUNTERS = ("total", "ended", "completed", "failed", "cancelled", "expired", "invalid", "prompt_tokens",
             "completion_tokens", "read", "read_invalid")
_JSON_FIELDS = ("metadata", "params", "errors")
# Why a batch whose reader (an API process) died fails (`BatchStore.abandoned`), as a read or the lost-task sweep
# finds it.
ABANDONED_ERROR = {"code": "abandoned", "message": "the API process reading the file stopped before the end; submit "
                   "the file again", "param": None, "line": None}

# A batch fails only while it is read (validating): a reader that was thought dead may have activated it meanwhile.
# One cancelled while it was read, and never activated, ends cancelled instead (no reader will count its lines).
# Either is final at once (OpenAI's `failed` has no line to wait for): it takes no more lines (_ADD_LINES), and its
# lines not ended yet end with it, from line `lines_to_end` on (_END_LINES). Ended here too, in the one script, they
# held Redis for a second with 50,000 lines, every other client (workers' steps, streams, submissions) waiting.
_FAIL = BATCH_END_LUA + """
local status, final = redis.call('HGET', KEYS[1], 'status'), 'failed'
if status == 'cancelling' and redis.call('HEXISTS', KEYS[1], 'total') == 0 then
  final = 'cancelled'
elseif status ~= 'validating' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', final, final .. '_at', ARGV[1], 'errors', ARGV[2], 'lines_to_end', 0)
keep_ended(KEYS[1], ARGV[1])
return 1
"""

# Up to ARGV[4] lines (KEYS[2]) of a batch (KEYS[1]) that _FAIL ended, from its line `lines_to_end` on, end with it:
# the ones not ended yet are cancelled (their results in KEYS[3], as _FINISH writes a cancelled job's, at the time the
# batch ended), and their jobs (ARGV[1] .. job id) no longer name the batch: one a worker still ran wrote its result
# into the batch when it ended, after the batch had ended (its files' sizes kept, its request counts shown). ARGV[2],
# ARGV[3]: a cancelled job's error and error code. Moves `lines_to_end` on past them, or drops it after the last line;
# returns 1 while lines are left.
_END_LINES = """
local status, from = unpack(redis.call('HMGET', KEYS[1], 'status', 'lines_to_end'))
if not from then return 0 end
local ended_at, size = tonumber(redis.call('HGET', KEYS[1], status .. '_at')), tonumber(ARGV[4])
from = tonumber(from)
local entries = redis.call('LRANGE', KEYS[2], from, from + size - 1)
local cancelled = 0
for offset, entry in ipairs(entries) do
  local number = from + offset - 1
  -- (the key as json.dumps writes it: a string value holds no unescaped quote)
  local job = string.match(entry, '"job": "([^"]+)"')
  if job and redis.call('HEXISTS', KEYS[3], number) == 0 then
    -- (a job key of another type, SET by hand, is left as it is, its line cancelled all the same: its HMGET failed
    -- the script, and every read of the batch, and its owner's batch and file lists, were a 503 "the job store is
    -- unavailable")
    local f = {}
    if redis.call('TYPE', ARGV[1] .. job)['ok'] == 'hash' then
      f = redis.call('HMGET', ARGV[1] .. job, 'model', 'started_at', 'first_token_at')
      redis.call('HDEL', ARGV[1] .. job, 'batch')
    end
    redis.call('HSET', KEYS[3], number, cjson.encode({status = 'cancelled', error = ARGV[2],
               error_code = tonumber(ARGV[3]), finish_reason = 'cancelled', text = '', prompt_tokens = 0,
               completion_tokens = 0, model = f[1] or '', started_at = tonumber(f[2]), first_token_at = tonumber(f[3]),
               finished_at = ended_at}))
    cancelled = cancelled + 1
  end
end
if cancelled > 0 then
  redis.call('HINCRBY', KEYS[1], 'cancelled', cancelled)
  redis.call('HINCRBY', KEYS[1], 'ended', cancelled)
  redis.call('EXPIRE', KEYS[3], math.max(redis.call('TTL', KEYS[1]), 1))
end
if #entries < size then
  redis.call('HDEL', KEYS[1], 'lines_to_end')
  return 0
end
redis.call('HSET', KEYS[1], 'lines_to_end', from + #entries)
return 1
"""

# Reading is done: set the line count, count the lines refused while reading, and start (or fail) the batch. A batch
# cancelled while it was read gets its count too, so that it ends `cancelled` with its last line. One that ended
# meanwhile (failed as abandoned, or `cancelled` so after a cancel: see _FAIL) does not: it keeps the lines it had
# when it ended (`read`, see _ADD_LINES), which its files and request counts show. The errors
# found while reading (ARGV[4], a JSON list; '' if none) follow the ones the batch has: written apart, they replaced
# the reason a batch failed as abandoned meanwhile had, which said why it failed. Its format (ARGV[5]) is recorded too.
# A batch gone meanwhile (deleted, evicted) answers 'missing' and is not written: an HSET made a new hash, without
# owner or TTL.
_ACTIVATE = BATCH_END_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
redis.call('HSET', KEYS[1], 'format', ARGV[5])
if ARGV[4] ~= '' then
  local before = redis.call('HGET', KEYS[1], 'errors')
  if before and before ~= '' and before ~= '[]' then
    redis.call('HSET', KEYS[1], 'errors', string.sub(before, 1, -2) .. ', ' .. string.sub(ARGV[4], 2))
  else
    redis.call('HSET', KEYS[1], 'errors', ARGV[4])
  end
end
local cancelled = status == 'cancelling' and redis.call('HEXISTS', KEYS[1], 'total') == 0
if status ~= 'validating' and not cancelled then return status end
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'invalid', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'ended', tonumber(ARGV[2]))
if cancelled then return end_batch_if_done(KEYS[1], ARGV[3]) end
if tonumber(ARGV[1]) == tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[3])
  keep_ended(KEYS[1], ARGV[3])
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[3])
return end_batch_if_done(KEYS[1], ARGV[3])
"""

# Lines read (KEYS[1] the batch, KEYS[2] its lines list, KEYS[3] its reader's lease): append their entries (ARGV[6..]),
# renew the list's TTL (ARGV[1]) and the lease (ARGV[2] s), record the file's format (ARGV[3], if given), and count the
# lines recorded (`read`, `read_invalid`: ARGV[4] of them refused), which a batch ended before its reader counted them
# (`total`, see _ACTIVATE) shows as its request counts. A batch final already (failed as abandoned, or cancelled so,
# while its reader went on) or gone (expired) takes none: its jobs (ARGV[5] .. job id) no longer name it, for their
# reader to cancel. Added, they grew the final batch (its total, and its errors file once their jobs were cancelled).
# Returns the batch's status.
_ADD_LINES = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' or status == 'expired' then
  for i = 6, #ARGV do
    -- (the key as json.dumps writes it: a string value holds no unescaped quote)
    local job = string.match(ARGV[i], '"job": "([^"]+)"')
    if job then redis.call('HDEL', ARGV[5] .. job, 'batch') end
  end
  return status or 'missing'
end
for i = 6, #ARGV, 1000 do redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'format', ARGV[3]) end
redis.call('HINCRBY', KEYS[1], 'read', #ARGV - 5)
redis.call('HINCRBY', KEYS[1], 'read_invalid', tonumber(ARGV[4]))
return status
"""

# As OpenAI's: a batch still read (validating) can be cancelled too; its reader stops at its next chunk of lines.
_CANCEL = BATCH_END_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'cancelling' then return status end
if status ~= 'in_progress' and status ~= 'validating' then return 'not:' .. (status or 'missing') end
redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
return end_batch_if_done(KEYS[1], ARGV[1])
"""

# Places in the queues taken: the jobs queued (KEYS[2..]) and the places batches being read still hold (KEYS[1]: batch
# id -> "<its non-blank lines> <owner>"; batch keys start with `prefix`). A batch holds what its reader has not recorded
# yet (its lines list); a reader without a lease (it died) holds nothing, and with `prune` its entry goes. Returns the
# places taken, and the places each owner's batches hold. A Lua fragment, shared by the scripts that count them.
_PLACES_TAKEN = """
local function places_taken(prefix, prune)
  local taken, owned = 0, {}
  for i = 2, #KEYS do taken = taken + redis.call('ZCARD', KEYS[i]) end
  local held = redis.call('HGETALL', KEYS[1])
  for i = 1, #held, 2 do
    local batch = prefix .. held[i]
    if redis.call('EXISTS', batch .. ':reader') == 1 then
      local lines, owner = string.match(held[i + 1], '^(%d+) ?(.*)$')
      -- (a lines key of another type, SET by hand, holds none: its LLEN failed every admission, of every key)
      local recorded = redis.call('TYPE', batch .. ':lines')['ok'] == 'list' and redis.call('LLEN', batch .. ':lines')
      local left = math.max(0, tonumber(lines) - (recorded or 0))
      taken = taken + left
      if owner ~= '' then owned[owner] = (owned[owner] or 0) + left end
    elseif prune then
      redis.call('HDEL', KEYS[1], held[i])
    end
  end
  return taken, owned
end
"""

# Places taken (see _PLACES_TAKEN), counted and taken for batch ARGV[1] (ARGV[2] lines, owner ARGV[5]) in one step.
# Returns {places taken, of them held by the owner's other batches}.
_RESERVE = _PLACES_TAKEN + """
local taken, owned = places_taken(ARGV[3], true)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[5])
redis.call('SET', ARGV[3] .. ARGV[1] .. ':reader', '1', 'EX', ARGV[4])
return {taken, ARGV[5] ~= '' and owned[ARGV[5]] or 0}
"""

# Places taken (see _PLACES_TAKEN), taking none (ARGV[1]: the batch key prefix). Returns {places taken, then each owner
# and the places its batches hold}.
_TAKEN = _PLACES_TAKEN + """
local taken, owned = places_taken(ARGV[1], false)
local answer = {taken}
for owner, left in pairs(owned) do
  answer[#answer + 1] = owner
  answer[#answer + 1] = left
end
return answer
"""

# A field (ARGV[1] = ARGV[2]) of a batch (KEYS[1]) that is still kept: HSET on one gone would make a new hash.
_KEEP_SIZE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""

# A page of an owner's batches (KEYS[1], its index), newest first, in one script, so that the cursor's rank and the
# ranges read after it agree while other requests add batches or drop expired ones (read in several calls, a page
# repeated or skipped batches): up to ARGV[2] + 1 ids after batch ARGV[1] (from the newest if empty) whose record
# (ARGV[3] .. id) is there. The expired ones read on the way (past the TTL, still in the index) leave it. Returns
# false when the cursor is not in the index (it expired, as every batch older than it did), else the ids.
_LIST_PAGE = AFTER_CURSOR_LUA + """
local want = tonumber(ARGV[2]) + 1
local live, gone = {}, {}
while #live < want do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + want - 1)
  for _, id in ipairs(ids) do
    if #live == want then break end
    if redis.call('EXISTS', ARGV[3] .. id) == 1 then live[#live + 1] = id else gone[#gone + 1] = id end
  end
  if #ids < want then break end
  start = start + #ids
end
for i = 1, #gone, 1000 do redis.call('ZREM', KEYS[1], unpack(gone, i, math.min(i + 999, #gone))) end
return live
"""

# A lease (KEYS[1]) given back by its holder (ARGV[1]) only.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A batch's output or errors file (KEYS[1] the batch) marked deleted (field ARGV[1]) once; 0 if the batch is gone (an
# HSETNX would make a new hash that never expires) or the file was deleted already.
_DELETE_OUTPUT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
"""

# An upload (KEYS[1] its key) kept, and listed, within its owner's storage limit. The owner's stored bytes (KEYS[4])
# count the files in KEYS[3] (file id -> bytes) whose expiry times are in KEYS[2]; the ones expired by now (ARGV[1])
# are taken off first, so the count needs no process watching keys expire. ARGV: now, TTL, file id, its description,
# its content, the owner, the limit in bytes (0: none), its size. Returns {1, bytes kept after} or {0, bytes kept now}.
_SAVE_FILE = """
local now, ttl, size, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[8]), tonumber(ARGV[7])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], id) or 0))
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[2], id)
end
local kept = tonumber(redis.call('GET', KEYS[4]) or 0)
if kept < 0 then
  redis.call('INCRBY', KEYS[4], -kept)
  kept = 0
end
if limit > 0 and kept + size > limit then return {0, kept} end
redis.call('HSET', KEYS[1], 'meta', ARGV[4], 'content', ARGV[5], 'owner', ARGV[6])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], size)
redis.call('INCRBY', KEYS[4], size)  -- (SET would drop the key's TTL)
-- The owner's files index (KEYS[5], GET /v1/files), which keeps no file past the TTL either.
redis.call('ZADD', KEYS[5], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - ttl)
-- Lengthened, never shortened: files kept under a longer TTL (a setting lowered since, or another API's) stay counted
-- until they expire (the index, trimmed by upload time, lists a file for the current TTL only).
for i = 2, 5 do
  if redis.call('TTL', KEYS[i]) < ttl then redis.call('EXPIRE', KEYS[i], ttl) end
end
return {1, kept + size}
"""

# An upload (KEYS[1]) deleted, and its bytes (ARGV[1] its id) taken off its owner's count (KEYS[2..4] as in _SAVE_FILE).
_DELETE_FILE = """
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  local kept = tonumber(redis.call('DECRBY', KEYS[4], size))
  if kept < 0 then redis.call('INCRBY', KEYS[4], -kept) end
end
return redis.call('DEL', KEYS[1])
"""

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The API process reading a batch file renews this lease with every chunk of lines it queues.
READER_LEASE_SECONDS = 60
# Lines per chunk of a batch-wide write (cancel its jobs: one read of their entries, one pipeline of cancel requests,
# one of endings; end a failed batch's lines, one script each; drop a deleted file's results and job records; the keys
# of a files scan): a few round trips per thousand lines, not one or two per line.
BULK_LINES = 1000
# Uploads missing from the files index are looked for once per database, in steps (see `BatchStore.index_files`): a
# list call takes at most this many (SCAN of BULK_LINES keys each) ...
FILES_SCAN_STEPS = 8
# ... and the scan's holder (one at a time) keeps its lease this long past its last step.
FILES_SCAN_LEASE_SECONDS = 60


class FilesFull(Exception):
    """An upload over its owner's storage limit (`BatchStore.max_file_bytes`)."""

    def __init__(self, size: int, kept: int, limit: int):
        super().__init__(f"this file ({size} bytes) and the files kept ({kept} bytes) would be over the limit of "
                         f"{limit} bytes of uploaded files")
        self.size, self.kept, self.limit = size, kept, limit


class DamagedBatch(DamagedRecord):
    """A read of a batch whose record is damaged: its key holds another type than a hash (a key SET by hand), or a
    field llava-queue writes (its status, a time, a count) does not read as one; or so are its lines or their results
    (`_KEY_TYPES`, `lines`). Answered as a damaged job is (a 500 that names the damage, api/errors.py), not as the
    WRONGTYPE of a Redis away (503 "try again shortly", logged as an outage) nor as a bare 500 (a ValueError); a list
    shows it as an entry of its own (`record`)."""

    def __init__(self, batch_id: str, damage: str):
        self.batch_id = batch_id
        self.message = (f"batch {batch_id}: the batch's record is damaged: {damage} (changed by hand, or by another "
                        "program on the key prefix)")
        redis.ResponseError.__init__(self, self.message)  # (DamagedRecord's own words name a job)

    def record(self) -> dict[str, Any]:
        """The batch as a list shows it: `failed` (final: a client stops following it there), its errors saying what
        its own read answers in its 500, nothing else read from its record, as the jobs list shows a damaged job."""
        return {"id": self.batch_id, "status": "failed", "counted": True, "metadata": None, "params": None,
                "errors": [{"code": "damaged_record", "message": self.message, "param": None, "line": None}],
                **dict.fromkeys(_TIMESTAMPS), **dict.fromkeys(_COUNTERS, 0)}


class DamagedFile(DamagedRecord):
    """A read of an uploaded file whose key is damaged: it holds another type than a hash, or its description does
    not read as `save_file` writes it. Answered as a damaged batch is: it was a 503 "the job store is unavailable"
    (WRONGTYPE) or a bare 500 (a ValueError, a KeyError), and failed the files list, every other file with it."""

    def __init__(self, file_id: str, damage: str):
        self.file_id = file_id
        self.message = (f"file {file_id}: the file's record is damaged: {damage} (changed by hand, or by another "
                        "program on the key prefix)")
        redis.ResponseError.__init__(self, self.message)


# A batch's keys, by the suffix of each to its record's key (its record, its lines, their results), and their types.
_KEY_TYPES = (("", "hash"), (":lines", "list"), (":results", "hash"))
# An upload's description (`save_file`): its fields and their types.
_FILE_FIELDS = {"id": str, "bytes": int, "created_at": int, "filename": str, "purpose": str}


def ended_at(record: dict[str, Any]) -> float | None:
    """When the batch ended (None while it has not): when its output files were made."""
    return next((record[f"{status}_at"] for status in FINAL_STATUSES if record[f"{status}_at"]), None)


def read_time(value: str) -> float:
    """A time field's value; ValueError for one that is no finite number (int() of it failed in the batch object, and
    a NaN sorted among the files put them out of order)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is no time")
    return number


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# What every batch id looks like (`new_batch_id`).
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")


def answer_id_of(job_id: str) -> str:
    """A line's `answer_id`: its job's UUID written as `shortuuid.encode` writes one (stable across reads)."""
    number, digits = int(job_id, 16), []
    while number:
        number, digit = divmod(number, len(_SHORTUUID_ALPHABET))
        digits.append(_SHORTUUID_ALPHABET[digit])
    return "".join(reversed(digits)).rjust(_SHORTUUID_LENGTH, _SHORTUUID_ALPHABET[0])


def window_seconds(window: str) -> int:
    """Seconds of a completion window such as "24h" (also s, m, d); ValueError otherwise."""
    number, unit = window[:-1], window[-1:]
    if not number.isdigit() or unit not in _WINDOW_UNITS or int(number) < 1:
        raise ValueError(f"completion_window {window!r}: give a whole number of s, m, h or d, such as '24h'")
    return int(number) * _WINDOW_UNITS[unit]


def _read_object(batch_id: str, where: str, number: int, raw: str) -> dict[str, Any]:
    """A line's entry (or result) as JSON; DamagedBatch where it is no JSON object (`where` names it): a bare 500 (a
    ValueError, or a TypeError further on) for the batch's files and lines."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise DamagedBatch(batch_id, f"its {where} {number} is no JSON object")
    return value


class BatchStore:
    """Batch records, their lines and results, and uploaded files, in the job store's Redis."""

    def __init__(self, store: JobStore, ttl_seconds: int, owner: str | None = None, max_file_bytes: int = 0):
        """`owner`, the caller's API key digest (None with keys off), scopes every read and write: a key
        sees, lists and cancels only the batches and files it created. `max_file_bytes`: the most bytes of uploaded
        files the owner may keep at once (0: no limit)."""
        self.store = store
        self.owner = owner_id(owner) if owner else ""
        self.redis: redis.Redis = store.redis
        self.prefix = store.prefix
        self.ttl_seconds = ttl_seconds
        self.max_file_bytes = max_file_bytes
        self._save_file = self.redis.register_script(_SAVE_FILE)
        self._delete_file = self.redis.register_script(_DELETE_FILE)
        self._activate = self.redis.register_script(_ACTIVATE)
        self._add_lines = self.redis.register_script(_ADD_LINES)
        self._cancel = self.redis.register_script(_CANCEL)
        self._fail = self.redis.register_script(_FAIL)
        self._end_lines = self.redis.register_script(_END_LINES)
        self._reserve = self.redis.register_script(_RESERVE)
        self._taken = self.redis.register_script(_TAKEN)
        self._delete_output = self.redis.register_script(_DELETE_OUTPUT)
        self._release = self.redis.register_script(_RELEASE)
        self._keep_size = self.redis.register_script(_KEEP_SIZE)
        self._list_page = self.redis.register_script(_LIST_PAGE)

    def key(self, batch_id: str) -> str:
        return f"{self.store.batch_prefix}{batch_id}"

    def lines_key(self, batch_id: str) -> str:
        return f"{self.key(batch_id)}:lines"

    def results_key(self, batch_id: str) -> str:
        return f"{self.key(batch_id)}:results"

    @property
    def index_key(self) -> str:
        """Sorted set of the owner's batch ids by creation time (GET /v1/batches)."""
        return f"{self.prefix}:batches" + (f":{self.owner}" if self.owner else "")

    @property
    def reservations_key(self) -> str:
        """Hash of the batches being read (every owner's) -> the places in the queues each holds (see `reserve`)."""
        return f"{self.prefix}:batch_reservations"

    def reserve(self, batch_id: str, lines: int) -> tuple[int, int]:
        """Hold `lines` places in the queues for a batch about to be read; returns how many were taken already (jobs
        queued, plus the places other batches being read still hold) and how many of those places the owner's other
        batches hold. Counted and held in one step, so two batches read at once cannot both be admitted to the last
        places, of the queues or of a key's quota (each was checked against a queue the other had not filled yet).
        `release` once the file is read."""
        taken, owned = self._reserve(keys=[self.reservations_key, *[self.store.queue_key(queue) for queue in QUEUES]],
                                     args=[batch_id, lines, self.store.batch_prefix, READER_LEASE_SECONDS, self.owner])
        return int(taken), int(owned)

    def places_taken(self) -> tuple[int, dict[str, int]]:
        """The places in the queues taken now, counted as `reserve` counts them but taking none: jobs queued and places
        batches being read hold; and of those held places, each owner's (`owner_id`)."""
        taken, *held = self._taken(keys=[self.reservations_key, *[self.store.queue_key(queue) for queue in QUEUES]],
                                   args=[self.store.batch_prefix])
        return int(taken), {owner: int(places) for owner, places in zip(held[::2], held[1::2])}

    def release(self, batch_id: str) -> None:
        """The batch's file is read (or refused): its lines are queued, or will not be; it holds no more places."""
        self.redis.hdel(self.reservations_key, batch_id)

    def create(self, batch_id: str, fields: dict[str, Any]) -> None:
        """A new batch in `validating`, listed in the index; it and its lines expire after the batch TTL, or, once it
        has ended, the TTL after its end (BATCH_END_LUA, shared/jobs.py): within twice the TTL either way. The index
        drops the batches past that (their records expired) and expires with its newest (or as its files do): it kept
        every batch ever created (only a batch list that paged as far as one dropped it), and GET /v1/files read each
        it named."""
        now = self.store.clock()
        record = {"id": batch_id, "owner": self.owner, "status": "validating", "created_at": repr(now), "ended": 0,
                  "completed": 0,
                  "failed": 0, "cancelled": 0, "expired": 0, "prompt_tokens": 0, "completion_tokens": 0,
                  **{name: value if isinstance(value, str) else json.dumps(value) for name, value in fields.items()}}
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(batch_id), mapping=record)
            pipe.expire(self.key(batch_id), self.ttl_seconds)
            pipe.zadd(self.index_key, {batch_id: now})
            pipe.zremrangebyscore(self.index_key, "-inf", now - 2 * self.ttl_seconds)
            pipe.expire(self.index_key, self.ttl_seconds)
            pipe.set(self.reader_key(batch_id), "1", ex=READER_LEASE_SECONDS)
            pipe.execute()

    def add_lines(self, batch_id: str, entries: list[dict[str, Any]], file_format: str | None = None) -> str:
        """Append lines (file order) to the batch: each entry names its job, or says why the line was refused; and
        record the file's format once known ("llava" or "openai"), which the output files are written in even if the
        file is never read to its end. Returns the batch's status: anything but `validating` (cancelled, or failed
        as abandoned) tells the reader to stop. A batch final already (or gone) takes none of these lines, and their
        jobs no longer name it: the reader cancels them (see _ADD_LINES).

        Also renews the reader's lease: a batch left `validating` without one was abandoned by an API
        process that died while reading it (see `abandoned`). And counts the lines recorded, refused ones apart: a batch
        that ends before its reader counts its lines (failed as abandoned, or cancelled then) shows these (see `get`).
        """
        if not entries:
            return self.redis.hget(self.key(batch_id), "status") or "missing"
        refused = sum("error" in entry for entry in entries)
        try:
            return self._add_lines(keys=[self.key(batch_id), self.lines_key(batch_id), self.reader_key(batch_id)],
                                   args=[self.ttl_seconds, READER_LEASE_SECONDS, file_format or "", refused,
                                         self.store.key(""), *[json.dumps(entry) for entry in entries]])
        except redis.ResponseError as exc:
            raise self._damage_of(batch_id, exc) from exc

    def reader_key(self, batch_id: str) -> str:
        return f"{self.key(batch_id)}:reader"

    def abandoned(self, record: dict[str, Any]) -> bool:
        """Whether a batch still being read (`validating`, or `cancelling` before its lines were counted) lost the
        API process reading it (no lease renewed for a while)."""
        unread = record["status"] == "validating" or (record["status"] == "cancelling" and not record["counted"])
        return (unread and self.store.clock() - record["created_at"] > READER_LEASE_SECONDS
                and not self.redis.exists(self.reader_key(record["id"])))

    def fail_abandoned(self, batch_ids: Sequence[str]) -> tuple[list[str], list[DamagedBatch]]:
        """Fail as abandoned (`fail`, ABANDONED_ERROR) those of these batches (every owner's) that lost their reader
        (`abandoned`), as a read of each does (`settled` in api/routes/batches.py), their records read in one round
        trip; returns their ids, and the damage of those failed whose lines could not be ended (their lines or results
        are damaged: raised, it failed the whole sweep, at every round). For the lost-task sweep, which sends no task of
        a batch still read: the lines of one whose reader died waited, queued, until a read of the batch failed it, or
        until their deadline. A record damaged (or gone) since the sweep read its status is left as it is."""
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(self.key(batch_id))
            raws = pipe.execute(raise_on_error=False)
        failed, damaged = [], []
        for batch_id, raw in zip(batch_ids, raws):
            try:
                record = self._typed(batch_id, raw) if isinstance(raw, dict) and raw else None
            except DamagedBatch:
                continue
            try:
                if record is not None and self.abandoned(record) and self.fail(batch_id, ABANDONED_ERROR):
                    failed.append(batch_id)
            except DamagedBatch as damage:
                damaged.append(damage)
        return failed, damaged

    def activate(self, batch_id: str, total: int, invalid: int, errors: Sequence[dict[str, Any]] = (),
                 file_format: str = "llava") -> str:
        """Reading is over: `total` lines, `invalid` of them refused, and the `errors` found reading the file, added to
        the batch's (the reason it failed while it was read comes first); its `file_format`. Returns the batch's status
        now ("missing" if it is gone)."""
        return self._activate(keys=[self.key(batch_id)], args=[total, invalid, repr(self.store.clock()),
                                                                json.dumps(list(errors)) if errors else "",
                                                                file_format])

    def fail(self, batch_id: str, error: dict[str, Any]) -> bool:
        """The batch could not be read to its end: `failed`, with the reason in its errors, and the jobs of the lines
        read so far cancelled (they do not make the batch, and its caller submits the file again). Only a batch
        still `validating` fails (one cancelled while it was read ends `cancelled`); returns whether this one did."""
        if not self._fail(keys=[self.key(batch_id)], args=[repr(self.store.clock()), json.dumps([error])]):
            return False
        self.end_lines(batch_id)
        self.cancel_jobs(batch_id)
        return True

    def end_lines(self, batch_id: str) -> None:
        """End, cancelled, the lines not ended yet of a batch that failed while it was read (or ended `cancelled` so:
        see _FAIL), BULK_LINES per script (_END_LINES), each a few milliseconds of Redis's one thread. Processes that
        do it at once share the work (each script goes on where the last one stopped; a line ends once). One that
        stopped part-way (it died) leaves the rest to the next read of the batch (`settled`); a line whose job ends
        before that still writes its result into the batch (_FINISH), as one that ended before the batch did."""
        try:
            while self._end_lines(keys=[self.key(batch_id), self.lines_key(batch_id), self.results_key(batch_id)],
                                  args=[self.store.key(""), CANCELLED_ERROR, int(ErrorCode.CANCELLED), BULK_LINES]):
                pass
        except redis.ResponseError as exc:
            raise self._damage_of(batch_id, exc) from exc

    def cancel_jobs(self, batch_id: str, job_ids: Iterable[str] | None = None) -> None:
        """Cancel the jobs of every line of the batch (or these `job_ids`), as `JobStore.cancel` does each (queued ones
        end `cancelled`, running ones leave their engine batch at the next step, ended ones stay as they are), in a few
        round trips per thousand lines: one or two per line took seconds for a batch of 50,000."""
        chunk: list[str] = []
        for job_id in self.job_ids(batch_id) if job_ids is None else job_ids:
            chunk.append(job_id)
            if len(chunk) == BULK_LINES:
                self.store.cancel_many(chunk)
                chunk = []
        self.store.cancel_many(chunk)

    def request_cancel(self, batch_id: str) -> str:
        """Move a batch in progress, or still being read, to `cancelling` (or at once to `cancelled` if every line
        has ended).

        Returns the status it has now; "not:<status>" for a batch in another status ("not:missing").
        """
        return self._cancel(keys=[self.key(batch_id)], args=[repr(self.store.clock())])

    def get(self, batch_id: str) -> dict[str, Any] | None:
        """The batch record with typed fields, or None if unknown (or expired); DamagedBatch for a damaged record.

        `counted`: whether its reader counted its lines (`total`, `invalid`: see _ACTIVATE). Until then (being read,
        or ended before its reader was done: failed as abandoned, cancelled while read), `total` and `invalid` are the
        lines recorded so far, so that its request counts add up (total = completed + failed + the lines still to end):
        they showed a total of 0 beside its cancelled lines counted as failed."""
        if not BATCH_ID.fullmatch(batch_id):
            return None  # not a batch's id: it might name another key of it (its lines, a list)
        try:
            raw = self.redis.hgetall(self.key(batch_id))
        except redis.ResponseError as exc:
            raise self._damage_of(batch_id, exc) from exc
        if not raw or raw.get("owner", "") != self.owner:
            return None
        return self._typed(batch_id, raw)

    def ended_times(self, batch_ids: Sequence[str]) -> dict[str, float]:
        """When each of these batches that has ended did (`ended_at`: when its output files were made), read in one
        round trip; not those still running, gone, or whose record is damaged (of another type, a time that is none),
        which a read of each answers (`get`)."""
        fields = [f"{status}_at" for status in FINAL_STATUSES]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hmget(self.key(batch_id), fields)
            answers = pipe.execute(raise_on_error=False)
        ended = {}
        for batch_id, values in zip(batch_ids, answers):
            if wrong_type(values):
                continue
            if isinstance(values, Exception):
                raise values
            try:
                at = ended_at({field: read_time(value) if value else None for field, value in zip(fields, values)})
            except ValueError:
                continue
            if at is not None:
                ended[batch_id] = at
        return ended

    def _damage_of(self, batch_id: str, exc: redis.ResponseError) -> redis.ResponseError:
        """`exc`, answered for a read of a batch's keys, as the DamagedBatch it is where one of them holds another type
        than its own (`_KEY_TYPES`: so a record SET by hand, which names no owner, is said damaged to any caller, as a
        job's is)."""
        if wrong_type(exc):
            with self.redis.pipeline(transaction=False) as pipe:
                for suffix, _ in _KEY_TYPES:
                    pipe.type(self.key(batch_id) + suffix)
                kinds = pipe.execute()
            for (suffix, expected), kind in zip(_KEY_TYPES, kinds):
                if kind not in (expected, "none"):
                    return DamagedBatch(batch_id, f"its {suffix + ' ' if suffix else ''}key holds a {kind}, not a "
                                                  f"{expected}")
        return exc

    @staticmethod
    def _typed(batch_id: str, raw: dict[str, str]) -> dict[str, Any]:
        """`get`'s record from the fields as read; DamagedBatch naming the fields that do not read as llava-queue
        writes them."""
        record: dict[str, Any] = dict(raw)
        unreadable = [] if raw.get("status") in _STATUSES else ["status"]
        for names, read, unset in ((_TIMESTAMPS, read_time, None), (_COUNTERS, int, 0),
                                   (_JSON_FIELDS, json.loads, None)):
            for name in names:
                try:
                    record[name] = read(raw[name]) if raw.get(name) else unset
                except (ValueError, RecursionError):  # (too deep a JSON nesting raises the latter)
                    unreadable.append(name)
        if raw.get("id") != batch_id:
            unreadable.append("id")
        if record["created_at"] is None:  # (one that does not read as a time is named above)
            unreadable.append("created_at")
        if unreadable:
            raise DamagedBatch(batch_id, f"it has no valid {', '.join(unreadable)}")
        record["counted"] = "total" in raw
        if not record["counted"]:
            record["total"], record["invalid"] = record["read"], record["read_invalid"]
        return record

    def list(self, limit: int, after: str | None = None) -> tuple[list[dict[str, Any] | DamagedBatch], bool]:
        """Batches newest first, `limit` of them after the batch id `after`; and whether more follow. Those expired
        (past the TTL, still in the index) are passed over, and leave the index (`_LIST_PAGE`): a page of them came
        short while live batches followed, or said more followed when none did. A batch whose record is damaged has
        its DamagedBatch in its place, not raised: it failed the whole list (a 503 "the job store is unavailable", or
        a bare 500), every other batch with it."""
        while True:
            ids = self._list_page(keys=[self.index_key], args=[after or "", limit, self.key("")])
            if not ids:
                # None: `after` left the index as it expired (past the TTL), as every batch older than it did.
                return [], False
            records = [self._get_or_damage(batch_id) for batch_id in ids[:limit]]
            unread = [batch_id for batch_id, record in zip(ids, records) if record is None]
            if not unread:
                return records, len(ids) > limit
            # Expired since the script read the index, or an entry that is no batch of this owner's (`get`): out of the
            # index, and the page read again (a page of one such came empty, saying more followed, with no last id).
            self.redis.zrem(self.index_key, *unread)

    def _get_or_damage(self, batch_id: str) -> dict[str, Any] | DamagedBatch | None:
        """`get`, with a damaged record's DamagedBatch answered, not raised."""
        try:
            return self.get(batch_id)
        except DamagedBatch as damaged:
            return damaged

    def job_ids(self, batch_id: str) -> Iterator[str]:
        """The job ids of the batch's lines that became jobs, in file order."""
        for _, entry, _ in self.lines(batch_id, with_results=False):
            if entry.get("job"):
                yield entry["job"]

    def lines(self, batch_id: str, with_results: bool = True, chunk: int = 1000,
              start: int = 0) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None]]:
        """(line number from 0, line entry, result or None while it runs) for every line from line `start`, in file
        order."""
        while True:
            try:
                raw = self.redis.lrange(self.lines_key(batch_id), start, start + chunk - 1)
                if not raw:
                    return
                numbers = [str(number) for number in range(start, start + len(raw))]
                results = self.redis.hmget(self.results_key(batch_id), numbers) if with_results else [None] * len(raw)
            except redis.ResponseError as exc:
                raise self._damage_of(batch_id, exc) from exc
            for number, (entry, result) in enumerate(zip(raw, results), start):
                yield number, _read_object(batch_id, ":lines entry", number, entry), (
                    _read_object(batch_id, ":results field", number, result) if result else None)
            start += len(raw)

    def progress(self, record: dict[str, Any]) -> dict[str, float | None]:
        """Tokens/s generated since the batch started, and an estimate of the seconds left (None when unknown)."""
        now = self.store.clock()
        started = record["in_progress_at"]
        if not started:
            return {"tokens_per_second": None, "estimated_seconds_left": None}
        done = record["status"] in FINAL_STATUSES
        end = (record["last_finished_at"] or now) if done else now
        elapsed = max(end - started, 1e-3)
        ran = record["ended"] - record["invalid"]
        left = record["total"] - record["ended"]
        estimate = 0.0 if done or left == 0 else (left * elapsed / ran if ran > 0 else None)
        return {"tokens_per_second": round(record["completion_tokens"] / elapsed, 2),
                "estimated_seconds_left": None if estimate is None else math.ceil(estimate)}

    def delete_output(self, batch_id: str, kind: str, numbers: Sequence[int], job_ids: Sequence[str]) -> bool:
        """Delete the batch's `kind` file ("output" or "errors"): drop the results of its lines, by line number
        (`numbers`), delete the records of their jobs (`job_ids`, ended ones), which hold the same answers
        (GET /v1/jobs/{id}), and mark it deleted (field `<kind>_deleted_at`); False if it was deleted already (or the
        batch is gone). The mark comes last, and the job records before the results that name them: a deletion cut
        short (Redis away) is made again in full, not refused as done. The record keeps its counts."""
        with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(job_ids), BULK_LINES):
                pipe.delete(*[self.store.key(job_id) for job_id in job_ids[start:start + BULK_LINES]])
            for start in range(0, len(numbers), BULK_LINES):
                pipe.hdel(self.results_key(batch_id), *numbers[start:start + BULK_LINES])
            pipe.execute()
        return bool(self._delete_output(keys=[self.key(batch_id)],
                                        args=[f"{kind}_deleted_at", repr(self.store.clock())]))

    def keep_file_size(self, batch_id: str, kind: str, size: int) -> None:
        """Keep the size of a finished batch's `kind` file ("output" or "errors"; field `<kind>_bytes`), counted once;
        not if the batch is gone (expired meanwhile: an HSET would make a new hash, without owner or TTL)."""
        self._keep_size(keys=[self.key(batch_id)], args=[f"{kind}_bytes", size])

    def batch_index(self) -> Sequence[tuple[str, float]]:
        """The owner's batch ids, with their creation times, oldest first; none past twice the TTL (see `create`)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.index_key, "-inf", self.store.clock() - 2 * self.ttl_seconds)
            pipe.zrange(self.index_key, 0, -1, withscores=True)
            return pipe.execute()[-1]

    # Uploaded files (POST /v1/files): their bytes and a description, kept as long as batches.
    def file_key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def _files_index(self, owner: str) -> str:
        return f"{self.prefix}:files" + (f":{owner}" if owner else "")

    @property
    def files_index_key(self) -> str:
        """Sorted set of the owner's uploaded file ids by upload time (GET /v1/files)."""
        return self._files_index(self.owner)

    @property
    def files_scanned_key(self) -> str:
        """Set, for good, once a scan for uploads missing from the files indexes went through every key (see
        `index_files`). (An earlier version set it for an hour after each scan.)"""
        return f"{self.prefix}:files_scanned"

    @property
    def files_scan_cursor_key(self) -> str:
        """The SCAN cursor a scan for uploads missing from the files indexes goes on from."""
        return f"{self.prefix}:files_scan_cursor"

    @property
    def files_scan_lease_key(self) -> str:
        """Held by the one process taking steps of that scan."""
        return f"{self.prefix}:files_scan_lease"

    def uploaded_files(self, scan_steps: int = FILES_SCAN_STEPS) -> Sequence[tuple[str, float]]:
        """The owner's uploaded file ids, with their upload times, oldest first. Files deleted or expired since stay
        until they are older than the TTL (the list skips them): a list's `after` may name one, and goes on from its
        place. Until the database's uploads kept before the index are all indexed, first takes at most `scan_steps`
        steps of that scan (`index_files`)."""
        if scan_steps:
            self.index_files(scan_steps)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.files_index_key, "-inf", self.store.clock() - self.ttl_seconds)
            pipe.zrange(self.files_index_key, 0, -1, withscores=True)
            return pipe.execute()[-1]

    def index_files(self, steps: int | None = None) -> bool:
        """Add every upload kept in Redis (every owner's) to its owner's index where it is missing: uploads kept by a
        version without the index (before GET /v1/files) were never listed. Returns whether that is done.

        Such uploads can only predate the index, so the keys (jobs and batches too: millions of them) are scanned
        once per database: a mark set once the scan has gone through them all (`files_scanned_key`) ends it for good.
        The scan goes in steps of a SCAN of BULK_LINES keys, `steps` of them at most (None: to its end), from the
        cursor the last step left (`files_scan_cursor_key`), by one process at a time (`files_scan_lease_key`; another
        returns at once): a list call that finds it unfinished waits for a few steps, not for the whole keyspace, and
        a process that dies part-way leaves the rest to the next. (It was made whole by the list call that found the
        last one an hour old, every hour.)"""
        if self.redis.exists(self.files_scanned_key):
            return True
        holder = uuid.uuid4().hex
        if not self.redis.set(self.files_scan_lease_key, holder, nx=True, ex=FILES_SCAN_LEASE_SECONDS):
            return False  # another process takes the steps now
        try:
            if self.redis.exists(self.files_scanned_key):
                return True  # done by the holder before
            cursor = int(self.redis.get(self.files_scan_cursor_key) or 0)
            for _ in range(steps) if steps is not None else itertools.count():
                cursor, keys = self.redis.scan(cursor, match=f"{glob_escaped(self.prefix)}:file:*", count=BULK_LINES)
                self._index_uploads(keys)
                with self.redis.pipeline(transaction=False) as pipe:
                    if int(cursor) == 0:
                        pipe.set(self.files_scanned_key, "1")  # no TTL (one an earlier version set goes)
                        pipe.delete(self.files_scan_cursor_key)
                    else:
                        pipe.set(self.files_scan_cursor_key, cursor)
                        pipe.expire(self.files_scan_lease_key, FILES_SCAN_LEASE_SECONDS)
                    pipe.execute()
                if int(cursor) == 0:
                    return True
            return False
        finally:
            self._release(keys=[self.files_scan_lease_key], args=[holder])

    def _index_uploads(self, keys: Sequence[str]) -> None:
        """Add the uploads of these file keys to their owners' indexes where they are missing."""
        if not keys:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, ["meta", "owner"])
                pipe.pttl(key)
            found = pipe.execute(raise_on_error=False)
        now = self.store.clock()
        with self.redis.pipeline(transaction=False) as pipe:
            for key, read, left_ms in zip(keys, found[::2], found[1::2]):
                # A damaged one (of another type, or a description that is none) is left out, a read of it saying why
                # (`file_meta`): it failed the scan's step, every time, and the scan never got past it.
                if wrong_type(read):
                    continue
                if isinstance(read, Exception):
                    raise read
                raw, owner = read
                try:
                    meta = self._read_meta(key[len(self.file_key("")):], raw) if raw else None
                except DamagedFile:
                    continue
                if meta:  # not expired meanwhile
                    index = self._files_index(owner or "")
                    # Its upload time as its TTL tells it (`created_at` has whole seconds only), so that it leaves
                    # the index as its key expires.
                    uploaded = now + left_ms / 1000 - self.ttl_seconds if left_ms >= 0 else meta["created_at"]
                    pipe.zadd(index, {meta["id"]: uploaded}, nx=True)
                    pipe.expire(index, self.ttl_seconds)
            pipe.execute()

    def save_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        """Store an uploaded file; returns its description (`id`, `bytes`, `created_at`, `filename`, `purpose`).
        FilesFull when the owner's files kept and this one would be over `max_file_bytes`: uploads were kept for the
        batch TTL with no bound, and one client's took all of Redis's memory."""
        now = self.store.clock()
        meta = {"id": f"file-{uuid.uuid4().hex}", "bytes": len(content), "created_at": int(now),
                "filename": filename, "purpose": purpose}
        saved, kept = self._save_file(
            keys=[self.file_key(meta["id"]), *self._files_kept_keys, self.files_index_key],
            args=[now, self.ttl_seconds, meta["id"], json.dumps(meta), content, self.owner, self.max_file_bytes,
                  len(content)])
        if not saved:
            raise FilesFull(len(content), int(kept), self.max_file_bytes)
        return meta

    @property
    def _files_kept_keys(self) -> tuple[str, str, str]:
        """The owner's uploads' expiry times, sizes and stored bytes (`_SAVE_FILE`)."""
        base = f"{self.prefix}:files_kept" + (f":{self.owner}" if self.owner else "")
        return f"{base}:expiry", f"{base}:sizes", f"{base}:bytes"

    def file_meta(self, file_id: str) -> dict[str, Any] | None:
        """An uploaded file's description, or None if unknown (or another key's); DamagedFile for a damaged one."""
        raw = self._owned_meta(file_id)
        return self._read_meta(file_id, raw) if raw else None

    def _owned_meta(self, file_id: str) -> str | None:
        """An upload's description as stored, if the upload is the owner's (None if unknown, or another key's);
        DamagedFile for a key of another type, which names no owner."""
        try:
            raw, owner = self.redis.hmget(self.file_key(file_id), ["meta", "owner"])
        except redis.ResponseError as exc:
            raise self._file_damage(file_id, exc) from exc
        return raw if raw and (owner or "") == self.owner else None

    @staticmethod
    def _read_meta(file_id: str, raw: str) -> dict[str, Any]:
        """An upload's description as read; DamagedFile where it is not one `save_file` writes (`_FILE_FIELDS`)."""
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):
            meta = None
        if not (isinstance(meta, dict) and all(type(meta.get(name)) is kind for name, kind in _FILE_FIELDS.items())
                and meta["id"] == file_id):
            raise DamagedFile(file_id, "its description (field meta) does not read as one")
        return meta

    def _file_damage(self, file_id: str, exc: redis.ResponseError) -> redis.ResponseError:
        """`exc`, answered for a read of an upload's key, as the DamagedFile it is where the key holds another type
        than a hash (said damaged to any caller: it names no owner)."""
        if wrong_type(exc):
            kind = self.redis.type(self.file_key(file_id))
            if kind not in ("hash", "none"):
                return DamagedFile(file_id, f"its key holds a {kind}, not a hash")
        return exc

    def file_content(self, file_id: str) -> bytes | None:
        """An uploaded file's bytes, or None if unknown (or another key's); DamagedFile for a damaged one."""
        with self.redis.pipeline(transaction=False) as pipe:
            # The store's client decodes replies as text; the file's bytes are read without decoding.
            pipe.execute_command("HGET", self.file_key(file_id), "content", **{NEVER_DECODE: []})
            pipe.hget(self.file_key(file_id), "owner")
            content, owner = answers = pipe.execute(raise_on_error=False)
        for answer in answers:
            if isinstance(answer, redis.ResponseError):
                raise self._file_damage(file_id, answer)
        return content if (owner or "") == self.owner else None

    def delete_file(self, file_id: str) -> bool:
        """Delete an uploaded file of the owner's; False if unknown (or another key's). Its entry in the index stays
        (see `uploaded_files`). One whose description is damaged is deleted too, its owner read as any upload's: it
        was a 500 that kept it, its bytes counted against the owner's limit, until it expired. (A key of another type
        names no owner: DamagedFile.)"""
        if self._owned_meta(file_id) is None:
            return False
        return bool(self._delete_file(keys=[self.file_key(file_id), *self._files_kept_keys], args=[file_id]))
