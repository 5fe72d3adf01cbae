"""The job store: one Redis hash per job, its queue position, and the pub/sub channel of its chunks; one hash per
distinct image of the active jobs (`JobStore.image_key`).

State machine: queued → running → succeeded | failed | cancelled | expired. Every transition
and every appended chunk is one Lua script, so a reader never sees a record half-written and
a chunk is published with the same sequence number the record holds. A listener subscribes
to the channel first, then reads the record (text and seq), then applies only chunks with a
larger seq: nothing is lost for a late or reconnecting listener.

Chunk messages on the channel (JSON):
  {"seq": n, "delta": "...", "tokens": n}          text appended to the job's output; its generated token count
  {"seq": n, "prompt": "..."}                      the worker rendered the job's messages into this prompt
  {"seq": n, "done": true, "status": ..., ...}     the job ended (status, error, error_code, finish_reason)
"""

import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import redis
from pydantic import ValidationError
from redis.commands.core import Script
from redis.exceptions import (ClusterDownError, NoScriptError, OutOfMemoryError, ReadOnlyError, ResponseError,
                              TryAgainError)

from shared.protocol import CONTEXT_OVERFLOW_MSG, ErrorCode, GenerateRequest

log = logging.getLogger("llava_queue.jobs")

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "expired")
QUEUES = ("interactive", "batch")
CANCELLED_ERROR = "cancelled by the client"
# What a step's write answers for a job whose record is gone (JobStore.record_step).
RECORD_GONE = -3
# And for a job whose record key holds another type than a hash (a key SET by hand): no job can run in it.
RECORD_DAMAGED = -4
# The error of a job whose record (or what it holds: its images, its batch) llava-queue finds damaged, `{}` saying how.
DAMAGED_ERROR = "the job's record is damaged: {} (changed by hand, or by another program on the key prefix)"
# The error of a job whose record had no status of the store's when a worker took it (`JobStore.start`).
DAMAGED_STATUS_ERROR = DAMAGED_ERROR.format("it has no status llava-queue writes")

# How many times a job may be handed back by workers told to stop (rolling restarts, scale-downs) before its next start
# fails it, by default (Settings.max_hand_backs, LLAVA_QUEUE_MAX_HAND_BACKS; JobStore's `max_hand_backs`). Hand-backs
# do not count against max_attempts (a restart must not fail a job), but without a bound of their own a job whose
# worker is stopped at every start (an eviction or a liveness probe it sets off) cycled for ever.
MAX_HAND_BACKS = 10


def handed_back_error(max_hand_backs: int) -> str:
    """The error of a job failed for having been handed back more than `max_hand_backs` times."""
    return (f"the job was handed back more than {max_hand_backs} times by workers told to stop (restarted or scaled "
            "down while it ran)")


# The error under the default bound (a store with another `max_hand_backs` has its own: JobStore.handed_back_error).
HANDED_BACK_ERROR = handed_back_error(MAX_HAND_BACKS)

# A job leaves its API key's set of queued jobs (JobStore.owner_key; `prefix` its key up to the owner id) when it
# starts or ends: the set was pruned only near the key's quota, and kept every job the key sent, expired ones too.
_FORGET_OWNED_LUA = """
local function owned_key(job_key, prefix)
  local owner = redis.call('HGET', job_key, 'owner')
  if owner and owner ~= '' then return prefix .. owner .. ':queued' end
end
local function forget_owned(job_key, prefix, job_id)
  local key = owned_key(job_key, prefix)
  if key then redis.call('ZREM', key, job_id) end
end
"""

_START = _FORGET_OWNED_LUA + f"local FINAL = {{{', '.join(f'{state} = true' for state in FINAL_STATES)}}}\n" + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' and not FINAL[status] then
  if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
  -- A record with no status of the store's (damaged by hand, or by another program on the prefix) is the caller's,
  -- to fail: skipped, it stayed in its queue for good, counted against MAX_QUEUED_JOBS, and never ended or expired.
  redis.call('HSET', KEYS[5], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'start_token', ARGV[7],
             'start_outcome', 'damaged')
  return 'damaged'
end
if status ~= 'queued' and status ~= 'running' then return status end
if status == 'running' then
  local holder = redis.call('HGET', KEYS[1], 'worker') or ''
  -- This very start sent again (its answer was lost with the connection, after it ran): the answer it had.
  if holder == ARGV[1] and ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'start_token') == ARGV[7] then
    return redis.call('HGET', KEYS[1], 'start_outcome')
  end
  -- A second delivery of a job that a live worker holds (or that this worker holds) is a duplicate.
  if holder == ARGV[1] or redis.call('EXISTS', ARGV[5] .. holder) == 1 then
    -- Claimed by the sweep while its holder's heartbeat lapsed: the job is the holder's again, so the sweep, which
    -- claims a job left claimed once a minute, does not deliver it again for as long as it runs.
    redis.call('HSET', KEYS[5], ARGV[3], holder)
    return 'duplicate'
  end
  -- Back in a queue after its worker died or handed it back: the text it has came from the model it started on, so
  -- only a worker of that model goes on with it. A message of it put back in the queue of jobs naming no model (its
  -- dead worker's, restored) is skipped by a worker of another model: the claim sent it to its model's queue too.
  local model = redis.call('HGET', KEYS[1], 'model') or ''
  if model ~= '' and ARGV[4] ~= '' and model ~= ARGV[4] then return 'other_model' end
end
local ended
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  ended = 'cancel'
elseif status == 'queued' then
  -- A deadline (or count below) that is no number (a record of another version, or edited by hand) counts as
  -- absent, as JobStore.get reads it: comparing its nil raised, and the job failed at every start.
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
  if deadline and deadline < tonumber(ARGV[2]) then ended = 'expired' end
else
  -- Back in a queue (handed back, or claimed from a dead worker) past the end of its new wait
  -- (_REQUEUE_DEADLINE_LUA): it expires as a queued one does, with the text it has.
  local deadline = tonumber(redis.call('HGET', KEYS[1], 'requeue_deadline'))
  if deadline and deadline < tonumber(ARGV[2]) then ended = 'expired' end
end
-- Starts that followed a hand-back (a worker told to stop) are no failed attempts: only the others count. Hand-backs
-- have a bound of their own (ARGV[8], the store's max_hand_backs): past it the job ends.
local handed_back = tonumber(redis.call('HGET', KEYS[1], 'handed_back')) or 0
if not ended and handed_back > tonumber(ARGV[8]) then ended = 'handed_back' end
if not ended then
  local attempts = (tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0) + 1
  redis.call('HSET', KEYS[1], 'attempts', attempts)
  -- Nor are starts that followed a hand-over (`JobStore.release` with `over`), which no bound limits: each went to a
  -- worker that could run the job, or back to the model's queue when none of them took it in time.
  local handed_over = tonumber(redis.call('HGET', KEYS[1], 'handed_over')) or 0
  if attempts - handed_back - handed_over > tonumber(ARGV[6]) then ended = 'exhausted' end
end
if ended then
  -- The caller ends the job. One its earlier worker held (dead, or handing it back) becomes the caller's, whose
  -- ending would be fenced off otherwise, leaving the job running for ever.
  if status == 'running' then
    redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'start_token', ARGV[7], 'start_outcome', ended)
  end
  return ended
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[3])
forget_owned(KEYS[1], ARGV[9], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[1])
if (redis.call('HGET', KEYS[1], 'model') or '') == '' then redis.call('HSET', KEYS[1], 'model', ARGV[4]) end
local outcome = 'running'
if status == 'running' then outcome = 'resumed' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'start_token', ARGV[7], 'start_outcome', outcome)
-- The steps of the worker that held it before count no more, nor its prompt (set_prompt writes it again), nor the
-- end of its wait in a queue.
redis.call('HDEL', KEYS[1], 'step', 'prompt_by', 'requeue_deadline')
if status == 'queued' then redis.call('HSET', KEYS[1], 'started_at', ARGV[2]) end
return outcome
"""

# The seq of a job's record (KEYS[1]) as the scripts read and count it. One that is no number (a record of another
# version, or edited by hand) counts as 0: HINCRBY raised on it, and a script's error failed every call sent in the
# same round trip (a step of every job a worker runs, the sweep of every overdue job before each admission).
_SEQ_LUA = """
local function seq_of(key) return tonumber(redis.call('HGET', key, 'seq')) or 0 end
local function next_seq(key)
  local seq = seq_of(key) + 1
  redis.call('HSET', key, 'seq', seq)
  return seq
end
"""

# One engine step's chunks in one call: KEYS holds each chunk's record and channel in turn; ARGV the worker and the
# step, then each chunk's text, completion tokens and first token's time (or ''). Answers each chunk's new seq in
# turn: -1 where the job is not running on this worker, -2 where its cancellation was asked for, -3 where its record
# is gone, -4 where its record is of another type (RECORD_DAMAGED). (A call a chunk,
# before: the round trip carried 32 calls a step of 32 jobs, 0.7 ms of the engine's step.)
_APPEND = """
local function append(key, channel, delta, tokens, first_at, worker, step)
  -- Read in one call (a chunk is a dozen of Redis' calls otherwise): what the checks below need. A record of another
  -- type (a key SET by hand) answers WRONGTYPE, which failed the whole step: every job the worker ran failed with it.
  local read = redis.pcall('HMGET', key, 'status', 'worker', 'step', 'seq', 'text', 'cancel_requested')
  if read.err then return -4 end
  local status, holder, last_step, seq, text, cancel = unpack(read)
  -- A record that is gone (Redis restarted without its data, the key deleted): said apart, for the worker's log.
  if not status then return -3 end
  -- Only the worker that holds the job may write to it (a fence against a worker thought dead).
  if status ~= 'running' or holder ~= worker then
    return -1
  end
  seq = tonumber(seq) or 0
  -- A step written again (its first try's answer was lost with the connection) is not appended twice.
  if step ~= '' and (tonumber(last_step) or -1) >= tonumber(step) then
    return seq
  end
  if first_at ~= '' then redis.call('HSETNX', key, 'first_token_at', first_at) end
  local fields = {'completion_tokens', tokens}
  if step ~= '' then
    fields[#fields + 1], fields[#fields + 2] = 'step', step
  end
  -- An empty text is a first token whose text is still held back (half a character, or maybe a stop string).
  if delta ~= '' then
    seq = seq + 1
    fields[#fields + 1], fields[#fields + 2] = 'seq', seq
    fields[#fields + 1], fields[#fields + 2] = 'text', (text or '') .. delta
  end
  redis.call('HSET', key, unpack(fields))
  if delta ~= '' then
    redis.call('PUBLISH', channel, cjson.encode({seq = seq, delta = delta, tokens = tonumber(tokens)}))
  end
  -- A cancellation asked for (DELETE) keeps the chunk and answers -2: stop the job. The broadcast on the control
  -- channel normally stops it sooner; this catches one that came before the job was in the worker's engine.
  if cancel == '1' then return -2 end
  return seq
end
local seqs = {}
for chunk = 1, #KEYS / 2 do
  local at = 2 + 3 * (chunk - 1)
  seqs[chunk] = append(KEYS[2 * chunk - 1], KEYS[2 * chunk], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[1],
                       ARGV[2])
end
return seqs
"""

# A batch (shared/batches.py) ends with its last line: completed, expired (some lines waited past
# its completion window), or cancelled. `ended`, `total` and the counters are fields of its hash.
# As it ends (`now`), its output files are made: it is kept, with its lines and results and its owner's index (named
# as `BatchStore.index_key` names it), the batch TTL from then (as long after its end as it was kept after its
# creation, `created_at`), as an upload is from its upload; never shortened. (The first read of the batch that found
# it ended did it: one not read within the TTL after its creation went, its files with it, though they were said to
# expire the TTL after its end.)
BATCH_END_LUA = """
local function keep_ended(bkey, now)
  local created, owner = unpack(redis.call('HMGET', bkey, 'created_at', 'owner'))
  local left = redis.call('TTL', bkey)
  if not tonumber(created) or left < 0 then return end
  local ttl = math.ceil(tonumber(now) - tonumber(created)) + left
  local keys = {bkey, bkey .. ':lines', bkey .. ':results'}
  local prefix = string.match(bkey, '^(.*):batch:[^:]+$')
  if prefix then keys[4] = prefix .. ':batches' .. ((owner or '') ~= '' and ':' .. owner or '') end
  for _, key in ipairs(keys) do
    local kept = redis.call('TTL', key)
    if kept >= 0 and kept < ttl then redis.call('EXPIRE', key, ttl) end
  end
end
local function end_batch_if_done(bkey, now)
  local b = redis.call('HMGET', bkey, 'status', 'total', 'ended', 'expired')
  local status, total, ended = b[1], tonumber(b[2]), tonumber(b[3]) or 0
  if not total or ended < total then return status end
  local final
  if status == 'in_progress' then
    if (tonumber(b[4]) or 0) > 0 then final = 'expired' else final = 'completed' end
  elseif status == 'cancelling' then
    final = 'cancelled'
  else
    return status
  end
  redis.call('HSET', bkey, 'status', final, final .. '_at', now)
  if final == 'completed' then redis.call('HSET', bkey, 'finalizing_at', now) end
  keep_ended(bkey, now)
  return final
end
"""

# A hand-back's or a claim's mark in the running hash: "requeued@<JobStore.clock()!r>". Only a rest that reads as a
# number makes a mark (`_mark_time`; _RELEASE's tonumber): a worker serving a model named "requeued" is named
# "requeued@<host>/<token>:<pid>" (workers/main.py), which the sweep took for a mark and failed on, at every round.
_REQUEUED = "requeued@"
# A queued job's place in its queue not read yet (JobStore._typed).
_UNREAD = object()

# Whether a holder in the running hash is a hand-back's or a claim's mark ("requeued@<time>", `prefix` the
# "requeued@"), not a worker's name: only a rest that reads as a number makes one (_mark_time, in Python).
_MARK_LUA = """
local function is_mark(holder, prefix)
  return holder and string.sub(holder, 1, #prefix) == prefix and tonumber(string.sub(holder, #prefix + 1)) ~= nil
end
"""

# A job with a deadline that goes back to a queue (handed back, or claimed from a dead worker; `key` its record,
# `deadlines` the deadline set, `now` a time as text) may wait there again as long as it could at first
# (`deadline_seconds`), from now, and then expires as a queued job does (`JobStore.expire_overdue`, _START): it waited
# for good where no worker of its model came. Not from its submission: a job started in time and handed back past its
# deadline (a rolling restart) would expire at once, its answer cut, instead of going on.
_REQUEUE_DEADLINE_LUA = """
local function requeue_deadline(key, deadlines, job_id, now)
  local deadline, created = unpack(redis.call('HMGET', key, 'deadline', 'created_at'))
  deadline, created = tonumber(deadline), tonumber(created)
  if not deadline or not created then return end
  local at = tostring(tonumber(now) + math.max(deadline - created, 0))
  redis.call('HSET', key, 'requeue_deadline', at)
  redis.call('ZADD', deadlines, at, job_id)
end
"""

# The images lists of a request as recorded (pydantic's compact JSON: `"images":[...]`; a base64 image or data: URL
# holds no "]", and a text no unescaped quote, so only an images list matches). _FINISH empties them the same way.
_IMAGES_RE = re.compile(r'"images":\[[^\]]*\]')

# What a script checks before it writes: Redis keeps what a script wrote before an error stopped it, and undoes nothing.
# `kind_of` a key's type; `misfit` the first of {key, type} pairs whose key holds another type than its own (or none),
# in words (nil if none does); `is_count` whether a field (nil or false: none) is one that HINCRBY or INCR can count
# on: a whole number as Redis writes it, of few enough digits that a step of one stays in its 64 bits.
_CHECKS_LUA = """
local function kind_of(key) return redis.call('TYPE', key)['ok'] end
local function misfit(expected)
  for _, pair in ipairs(expected) do
    local kind = kind_of(pair[1])
    if kind ~= 'none' and kind ~= pair[2] then return pair[1] .. ' holds a ' .. kind .. ', not a ' .. pair[2] end
  end
end
local function is_count(value)
  return not value or value == '0' or (#value <= 18 and string.match(value, '^-?[1-9]%d*$') ~= nil)
end
"""

# What is damaged in each stored image (KEYS), in words, or '' where nothing is: its key of another type than a hash, a
# count of holders that is no number (as _FINISH checks them: `is_count`), or data of another length than its image's
# (ARGV, in the same order; no data yet is none). Read before a submission's jobs are written (api/submission.py).
_IMAGE_DAMAGE = _CHECKS_LUA + """
local damage = {}
for i, key in ipairs(KEYS) do
  local kind, what = kind_of(key), ''
  if kind ~= 'none' and kind ~= 'hash' then
    what = 'its key holds a ' .. kind .. ', not a hash'
  elseif not is_count(redis.call('HGET', key, 'refs')) then
    what = 'its count of holders (field refs) is no number'
  else
    local size = redis.call('HSTRLEN', key, 'data')
    if size ~= 0 and size ~= tonumber(ARGV[i]) then
      what = 'its data is ' .. size .. " bytes, not the image's " .. ARGV[i]
    end
  end
  damage[i] = what
end
return damage
"""

# A job's ending. Everything it writes is checked before the first write: it stopped at the first key it could not
# write (an image key of another type, a count that is no number) with the job ended in its record, and still in the
# running hash, its ending unpublished, its other images held and its record kept for good. What is the job's own and
# damaged (an image key, its batch) is left as it is, and the job fails, saying what is damaged (DAMAGED_ERROR); a
# key of the store's of another type (a queue, the running hash, the deadline set, an owner's quota) ends nothing,
# answering a WRONGTYPE error that names it; a metrics count that is no number is not counted (`totals` reads it as
# absent). A record of another type (a key SET by hand) leaves the queues, the running hash and the deadline set,
# and is left as it is: no job can run or end in it, and it stayed in its queue for good, counted as queued.
_FINISH = (BATCH_END_LUA + _SEQ_LUA + _MARK_LUA + _FORGET_OWNED_LUA + _CHECKS_LUA
           + f"local CONTEXT_OVERFLOW = {json.dumps(CONTEXT_OVERFLOW_MSG)}\n"
           + f"local REQUEUED = {json.dumps(_REQUEUED)}\n"
           + f"local DAMAGED = {json.dumps(DAMAGED_ERROR.replace('{}', '%s'))}\n"
           + f"local SERVER_ERROR = '{int(ErrorCode.SERVER_ERROR)}'\n" + """
local function refused(what) return redis.error_reply('WRONGTYPE job ' .. ARGV[8] .. ': ' .. what) end
local record = kind_of(KEYS[1])
if record == 'none' then return 'missing' end
local listed = {{KEYS[3], 'zset'}, {KEYS[4], 'zset'}, {KEYS[5], 'hash'}, {KEYS[6], 'zset'}}
if record ~= 'hash' then
  local wrong = misfit(listed)
  if wrong then return refused('it stays where it is listed: ' .. wrong) end
  for _, key in ipairs({KEYS[3], KEYS[4], KEYS[6]}) do redis.call('ZREM', key, ARGV[8]) end
  redis.call('HDEL', KEYS[5], ARGV[8])
  return refused(string.format(DAMAGED, 'its key holds a ' .. record .. ', not a hash') ..
                 '; it leaves its queue, and its key is left as it is')
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
-- ARGV[6]: the status the job must have ('' any), or 'waiting': queued, or running with no worker running it (a mark
-- holds it: handed back, or claimed from a dead worker) past the end of its new wait (_REQUEUE_DEADLINE_LUA).
if ARGV[6] == 'waiting' then
  if status == 'running' then
    local waits_until = tonumber(redis.call('HGET', KEYS[1], 'requeue_deadline'))
    if not (waits_until and waits_until <= tonumber(ARGV[5]) and is_mark(redis.call('HGET', KEYS[5], ARGV[8]),
                                                                          REQUEUED)) then
      return status
    end
  end
elseif ARGV[6] ~= '' and status ~= ARGV[6] then
  return status
end
if ARGV[9] ~= '' and status == 'running' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[9] then return 'fenced' end
local owned = owned_key(KEYS[1], ARGV[12])
if owned then listed[#listed + 1] = {owned, 'zset'} end
local wrong = misfit(listed)
if wrong then return refused('its ending was not written: ' .. wrong) end
local final, err, code, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local damage
local function damaged(what)
  damage = damage or what
  final, err, code, reason = 'failed', string.format(DAMAGED, damage), SERVER_ERROR, 'error'
end
-- Its hold on the stored images (see JobStore.image_key), let go of below.
local held = redis.call('HGET', KEYS[1], 'image_keys')
local images = {}
for key in string.gmatch(held or '', '%S+') do
  local kind = kind_of(key)
  if kind ~= 'none' and kind ~= 'hash' then
    damaged('its image key ' .. key .. ' holds a ' .. kind .. ', not a hash')
  elseif not is_count(redis.call('HGET', key, 'refs')) then
    damaged('the count of holders of its image key ' .. key .. ' is no number')
  else
    images[#images + 1] = key
  end
end
-- A line of a batch: its result is copied into the batch, which outlives the job record, and counted.
local batch, line = unpack(redis.call('HMGET', KEYS[1], 'batch', 'batch_line'))
local bkey = batch and ARGV[11] .. batch
if bkey and redis.call('EXISTS', bkey) == 0 then bkey = nil end
local f = redis.call('HMGET', KEYS[1], 'text', 'prompt_tokens', 'completion_tokens', 'model', 'started_at',
                     'first_token_at')
if ARGV[10] ~= '' then f[3] = ARGV[10] end
local function counted_as()
  local counted = ({succeeded = 'completed'})[final] or final
  if counted == 'completed' and (tonumber(f[3]) or 0) == 0 and f[1] == CONTEXT_OVERFLOW then
    counted = 'failed'  -- the context guard's answer (shared.protocol.context_overflowed): the line fails
  end
  return counted
end
if bkey then
  local wrong_batch = misfit({{bkey, 'hash'}, {bkey .. ':results', 'hash'}})
  if not wrong_batch then
    for _, count in ipairs(redis.call('HMGET', bkey, counted_as(), 'prompt_tokens', 'completion_tokens', 'ended')) do
      if not is_count(count) then wrong_batch = 'a count of ' .. bkey .. ' is no number' end
    end
  end
  if wrong_batch then
    damaged('its batch is: ' .. wrong_batch)
    bkey = nil
  end
end
local finished_field = final .. ':' .. code
local counts_minute = misfit({{KEYS[7], 'string'}}) == nil and is_count(redis.call('GET', KEYS[7]))
local counts_total = misfit({{KEYS[8], 'hash'}}) == nil and is_count(redis.call('HGET', KEYS[8], finished_field))
-- Checked: from here on every write is one Redis takes.
local seq = next_seq(KEYS[1])
redis.call('HSET', KEYS[1], 'status', final, 'error', err, 'error_code', code, 'finish_reason', reason,
           'finished_at', ARGV[5])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'completion_tokens', ARGV[10]) end
-- Its images go (a poll shows its parameters, never its images, and they were most of a record kept for its TTL).
-- Plain finds (memchr-fast; a pattern's gsub took ~2 ms of Redis's one thread for a 150 KB image).
local request = redis.call('HGET', KEYS[1], 'request')
if request and string.find(request, '"images":[', 1, true) then
  local parts, from = {}, 1
  while true do
    local _, open = string.find(request, '"images":[', from, true)
    local close = open and string.find(request, ']', open + 1, true)
    if not close then break end
    parts[#parts + 1] = string.sub(request, from, open)
    from = close
  end
  parts[#parts + 1] = string.sub(request, from)
  redis.call('HSET', KEYS[1], 'request', table.concat(parts))
end
-- And so does its hold on the stored images: the last job to let one go deletes it. A damaged one is left as it is.
for _, key in ipairs(images) do
  if redis.call('HINCRBY', key, 'refs', -1) <= 0 then redis.call('DEL', key) end
end
if held then redis.call('HDEL', KEYS[1], 'image_keys') end
redis.call('ZREM', KEYS[3], ARGV[8])
redis.call('ZREM', KEYS[4], ARGV[8])
redis.call('HDEL', KEYS[5], ARGV[8])
redis.call('ZREM', KEYS[6], ARGV[8])
forget_owned(KEYS[1], ARGV[12], ARGV[8])
if counts_minute then
  redis.call('INCR', KEYS[7])
  redis.call('EXPIRE', KEYS[7], 180)
end
if counts_total then redis.call('HINCRBY', KEYS[8], finished_field, 1) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
redis.call('PUBLISH', KEYS[2], cjson.encode({seq = seq, done = true, status = final, error = err,
           error_code = tonumber(code), finish_reason = reason}))
if bkey then
  redis.call('HSET', bkey .. ':results', line, cjson.encode({status = final, error = err,
             error_code = tonumber(code), finish_reason = reason, text = f[1] or '',
             prompt_tokens = tonumber(f[2]) or 0, completion_tokens = tonumber(f[3]) or 0, model = f[4] or '',
             started_at = tonumber(f[5]), first_token_at = tonumber(f[6]), finished_at = tonumber(ARGV[5])}))
  local ttl = redis.call('TTL', bkey)
  if ttl > 0 then redis.call('EXPIRE', bkey .. ':results', ttl) end
  redis.call('HINCRBY', bkey, counted_as(), 1)
  -- A token count of the record's that is no count (1.5, edited by hand) adds none: HINCRBY took only a whole one.
  redis.call('HINCRBY', bkey, 'prompt_tokens', is_count(f[2]) and f[2] or 0)
  redis.call('HINCRBY', bkey, 'completion_tokens', is_count(f[3]) and f[3] or 0)
  redis.call('HSET', bkey, 'last_finished_at', ARGV[5])
  redis.call('HINCRBY', bkey, 'ended', 1)
  end_batch_if_done(bkey, ARGV[5])
end
if damage then return 'damaged' end
return 'ok'
""")

# A cancel asked for (KEYS[3] the running hash, ARGV[2] _REQUEUED): the job's status, and for a running job that no
# worker runs now (handed back, or claimed from a dead worker: its holder is a mark, and its task message waits in a
# queue, for a worker of its model that may never come) '1' and the holder its record names, to end it at once as a
# queued one: {status, '1' or '', holder or ''}.
_REQUEST_CANCEL = _MARK_LUA + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', '', ''} end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('PUBLISH', KEYS[2], ARGV[1])
end
if status == 'running' then
  local holder = redis.call('HGET', KEYS[3], ARGV[1])
  if is_mark(holder, ARGV[2]) then
    return {status, '1', redis.call('HGET', KEYS[1], 'worker') or ''}
  end
end
return {status, '', ''}
"""

_SET_PROMPT = _SEQ_LUA + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'worker') ~= ARGV[3] then return -1 end  -- another worker holds it now
-- This very write sent again (its answer was lost with the connection, after it ran): the prompt of this holder's
-- start is written and published once (_START forgets `prompt_by` when the job changes hands).
if redis.call('HGET', KEYS[1], 'prompt_by') == ARGV[3] then return seq_of(KEYS[1]) end
local seq = next_seq(KEYS[1])
redis.call('HSET', KEYS[1], 'prompt', ARGV[1], 'prompt_tokens', ARGV[2], 'prompt_by', ARGV[3])
redis.call('PUBLISH', KEYS[2], cjson.encode({seq = seq, prompt = ARGV[1]}))
return seq
"""

# The sweep's claim of a job (KEYS[1] the running hash, KEYS[2] its record, KEYS[3] the deadline set) whose holder
# was ARGV[2]: marked ARGV[3] (made at ARGV[5]; ARGV[4] _REQUEUED). A job taken from a dead worker starts a new wait
# in a queue (_REQUEUE_DEADLINE_LUA); one claimed again (its holder a mark: no worker started it since) goes on
# with the wait it had.
_CLAIM = _MARK_LUA + _REQUEUE_DEADLINE_LUA + """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
-- This very claim made again (its answer was lost with the connection, or the delivery after it failed): claimed.
if holder == ARGV[3] then return 1 end
if holder ~= ARGV[2] then return 0 end
-- Nor has one whose record is of another type (a key SET by hand): forgotten too, answering its type. Its WRONGTYPE
-- failed the sweep's every round, as a Redis away, and the claims of the other jobs of dead workers with it.
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'hash' and kind ~= 'none' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return kind
end
-- A job whose record is gone (deleted, evicted) has nothing to run: forgotten, not delivered again every minute.
if redis.call('HGET', KEYS[2], 'status') ~= 'running' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if not is_mark(ARGV[2], ARGV[4]) then requeue_deadline(KEYS[2], KEYS[3], ARGV[1], ARGV[5]) end
return 1
"""


def _mark_time(holder: str) -> float | None:
    """When the mark `holder` was made, or None if `holder` is no mark (a worker's name)."""
    if not holder.startswith(_REQUEUED):
        return None
    try:
        at = float(holder.removeprefix(_REQUEUED))
    except ValueError:
        return None
    return at if math.isfinite(at) else None

# A worker's hand-back of job ARGV[1] (KEYS as _CLAIM's): the running hash marks it ARGV[4] (made at ARGV[6]), and the
# record's holder becomes ARGV[3] (requeued@<worker>), so the worker's late writes are fenced off. The job starts a new
# wait in a queue (_REQUEUE_DEADLINE_LUA).
_RELEASE = _MARK_LUA + _REQUEUE_DEADLINE_LUA + """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
local worker = redis.call('HGET', KEYS[2], 'worker')
local running = redis.call('HGET', KEYS[2], 'status') == 'running'
-- This very hand-back sent again (its answer was lost with the connection, after it ran), and nobody has started the
-- job since: handed back (a "not held" made the worker keep a job whose writes were fenced off).
if running and worker == ARGV[3] and is_mark(holder, ARGV[5]) then return 1 end
-- Not this worker's (or its record is gone: a new one of one field would outlive it).
if not running or holder ~= ARGV[2] or worker ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], 'worker', ARGV[3])
-- A hand-back is no failed attempt: the job's next start is not counted against its limit (_START); ARGV[7] names
-- which count it adds to, `handed_back` (bounded) or `handed_over`.
redis.call('HINCRBY', KEYS[2], ARGV[7], 1)
requeue_deadline(KEYS[2], KEYS[3], ARGV[1], ARGV[6])
return 1
"""

# A submission's Idempotency-Key checked in one round trip (api/submission.py): record the fingerprint ARGV[1] of its
# body under KEYS[1] unless the key was used before (then answer the first body's), and the job each of KEYS[2..]
# names. Answers {1 if recorded here, the first body's fingerprint or false, {job or false, ...}}.
_CHECK_IDEMPOTENCY = """
-- One GET a key: MGET with unpack(KEYS, 2) is a Lua error past 8,000 keys, and a bulk may hold 10,000 jobs. A key
-- whose job's record is gone (expired: JOB_TTL_SECONDS may be shorter than IDEMPOTENCY_TTL_SECONDS, or deleted) goes
-- with it, as though it had expired too: a retry got the id of a job that no longer existed (a 202 "queued" for a 404,
-- a chat completion's 500). When every job the key named is gone, so is the body it was first sent with.
local jobs, named, gone = {}, 0, 0
for i = 2, #KEYS do
  local job = redis.call('GET', KEYS[i])
  if job then
    named = named + 1
    if redis.call('EXISTS', ARGV[3] .. job) == 0 then
      redis.call('DEL', KEYS[i])
      job, gone = false, gone + 1
    end
  end
  jobs[i - 1] = job
end
if named > 0 and gone == named then redis.call('DEL', KEYS[1]) end
local first = false
local recorded = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if not recorded then first = redis.call('GET', KEYS[1]) end
return {recorded and 1 or 0, first, jobs}
"""

# list_job(key, job, at, ttl): the entry of a new job, created at `at`, in its owner's list (`key`, `JobStore.list_key`)
# unless `ttl` (the records' TTL) is empty (a batch line, listed by its batch); the entries older than that TTL go, and
# the list of an owner who submits no more goes with them. On a MULTI: `JobStore._write_queued`, `_write_listed`.
_LISTED_WRITE = """
local function list_job(key, job, at, ttl)
  if ttl == '' then return end
  redis.call('ZADD', key, at, job)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', tonumber(at) - tonumber(ttl))
  redis.call('EXPIRE', key, ttl)
end
"""

# The writes that make a new `queued` job, in a script (K is KEYS past the script's own): take the next enqueue order
# (K[1]), hold each image (ARGV[7] of them, key and data pairs from ARGV[8]; written before the record: a record is
# never without its images), write the record (K[2], the fields after the images), its queue entry (K[3], member
# ARGV[1]), the submitted count (K[4], field ARGV[3]), its deadline (K[5], ARGV[4] unless empty), its entry in its
# owner's list (K[6], unless ARGV[6], the records' TTL, is empty: _LISTED_WRITE) and in its owner's quota (K[7] if
# given, scored ARGV[5]). The same writes as `JobStore._write_queued`, which queues them on a MULTI.
_QUEUED_WRITES = _LISTED_WRITE + """
local order = redis.call('INCR', K[1])
local images = tonumber(ARGV[7])
for i = 8, 7 + 2 * images, 2 do
  redis.call('HSETNX', ARGV[i], 'data', ARGV[i + 1])
  redis.call('HINCRBY', ARGV[i], 'refs', 1)
end
redis.call('HSET', K[2], unpack(ARGV, 8 + 2 * images))
redis.call('ZADD', K[3], order, ARGV[1])
redis.call('HINCRBY', K[4], ARGV[3], 1)
if ARGV[4] ~= '' then redis.call('ZADD', K[5], ARGV[4], ARGV[1]) end
list_job(K[6], ARGV[1], ARGV[5], ARGV[6])
if K[7] then redis.call('ZADD', K[7], ARGV[5], ARGV[1]) end
"""

# A job created under an Idempotency-Key, in one script (one round trip; a bulk submission's jobs pipelined in one):
# unless the key (KEYS[1]) names a job already, the _QUEUED_WRITES (K = KEYS[2..]), then the key (TTL ARGV[2]). A
# script is atomic: two submissions of one key create one job. The key is written last: a script stopped by an error
# keeps what it wrote before it, and the key must never name a job whose record was not written. Answers {the key's
# job, 1 if created here}. (It was WATCH, GET, INCR, then MULTI/EXEC: four round trips a job.)
_CREATE_KEYED = """
local existing = redis.call('GET', KEYS[1])
if existing then return {existing, 0} end
local K = {unpack(KEYS, 2)}
""" + _QUEUED_WRITES + """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {ARGV[1], 1}
"""

# A job of a batch's many, in one script (K = KEYS; ARGV[2] unused): each job's writes are whole, while the batch's
# hundreds of jobs, pipelined, do not hold Redis as one MULTI would. (They were plain commands on a pipeline: an API
# cut off mid-way left an image's hold counted for a record never written, and the image stored for good.)
_CREATE = "local K = KEYS\n" + _QUEUED_WRITES + "return 1\n"

# A cancel by Idempotency-Key that comes before its submission (POST /v1/jobs/cancel), in one script: unless the key
# (KEYS[1]) names a job whose record (ARGV[6] .. id) is there, write a record cancelled from the start (KEYS[2],
# fields ARGV[7..], TTL ARGV[3]), count it among the jobs that ended (KEYS[3], field ARGV[4]), then take the key for it
# (TTL ARGV[2]; the body fingerprint of a key whose job is gone, KEYS[5], goes). It never enters a queue, the deadline
# set, an owner's quota or the submitted count: it was never waiting, and an API that died half-way (it was a queued
# job, then a cancel) left a queued job with no task. It is listed (KEYS[4], created at ARGV[5]), as GET /v1/jobs/{id}
# answers it. The key is written last, as in _CREATE_KEYED. Answers {the key's job, 1 if created here (or by this very
# call sent again, ARGV[1])}.
_CREATE_CANCELLED = _LISTED_WRITE + """
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= ARGV[1] and redis.call('EXISTS', ARGV[6] .. existing) == 0 then
  -- Its job's record is gone (expired before its key): the key is free, and so is the body it was sent with, as
  -- _CHECK_IDEMPOTENCY has it. Counted as taken, the cancel answered 404 and the submission after it ran its job.
  redis.call('DEL', KEYS[5])
  existing = false
end
if existing then return {existing, existing == ARGV[1] and 1 or 0} end
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
list_job(KEYS[4], ARGV[1], ARGV[5], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {ARGV[1], 1}
"""

# The rank in a sorted set read newest first (KEYS[1]) just after a cursor, an id of it (ARGV[1]; '' reads from the
# newest), as `start`; the script answers false when the cursor is no longer in the set (it expired, as every entry
# older than it did). A list's page (`_LIST_CHUNK`; shared.batches' `_LIST_PAGE`).
AFTER_CURSOR_LUA = """
local start = 0
if ARGV[1] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[1])
  if not rank then return false end
  start = rank + 1
end
"""

# How many jobs of the index `JobStore.list_jobs` reads at most for a page, per job the page may hold: a status that
# few jobs have does not make one request read an owner's whole index (LIST_SCAN_FACTOR x limit entries at most).
LIST_SCAN_FACTOR = 10

# A chunk of an owner's list (KEYS[1]), newest first: up to ARGV[2] ids after id ARGV[1] (from the newest if empty),
# with each one's status ('' for a job whose record is gone: dropped from the list here; 'damaged' for one whose key
# holds another type). Answers {ids, statuses}, or
# false when ARGV[1] is no longer in the list. One script, so that the rank of ARGV[1] and the range read after it
# agree while other requests add jobs or drop gone ones.
_LIST_CHUNK = AFTER_CURSOR_LUA + """
local ids = redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[2]) - 1)
local statuses, gone = {}, {}
for i, id in ipairs(ids) do
  -- A record of another type (a key SET by hand) answers WRONGTYPE, which failed the whole listing (a 503, "the job
  -- store is unavailable"): it is listed as a job in no state of the store's, which `get_many` reports as damaged.
  local status = redis.pcall('HGET', ARGV[3] .. id, 'status')
  if type(status) == 'table' then status = 'damaged' end
  statuses[i] = status or ''
  if statuses[i] == '' then gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return {ids, statuses}
"""

# How many overdue jobs `expire_overdue` ends in one pipelined round trip.
EXPIRE_ROUND = 1000

# Drop from the deadline set (KEYS[1]) each job of ARGV[2..] whose deadline there is still at most ARGV[1] (those
# `expire_overdue` read as overdue and found not waiting): one handed back since has a new deadline, which stays.
_FORGET_DEADLINES = """
local dropped = 0
for i = 2, #ARGV do
  local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if score and score <= tonumber(ARGV[1]) then dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return dropped
"""

# What a Redis away, not answering in time, or refusing writes for a while raises: a write that met one may work if
# sent again later (the worker's writes are tried again, `when_redis_answers` in workers/generation.py). Away or
# silent: a connection error (LOADING, a Redis reading its data back after a restart, is one: BusyLoadingError), a
# timeout. Refusing: out of memory (maxmemory with noeviction, until records expire or the limit is raised), a
# read-only replica (READONLY: a failover demoted the node, or its promotion is not done), a replica cut off from its
# master (MASTERDOWN, a ClusterDownError, as CLUSTERDOWN), a cluster moving slots (TRYAGAIN). A script refused stops
# at its first write, having written nothing. Any other error (a permission an ACL denies, NOPERM; a key of another
# type, WRONGTYPE; a script error) is permanent: the same write would fail again.
_ANSWERS_LATER = (redis.ConnectionError, redis.TimeoutError, OutOfMemoryError, ReadOnlyError, ClusterDownError,
                  TryAgainError)
# The same for refusals that redis-py raises as a plain ResponseError, told by the code their message starts with: a
# script running past busy-reply-threshold (BUSY), fewer replicas than min-replicas-to-write (NOREPLICAS), a failed
# snapshot with stop-writes-on-bgsave-error (MISCONF).
_ANSWERS_LATER_CODES = frozenset({"BUSY", "NOREPLICAS", "MISCONF"})


def answers_later(exc: BaseException) -> bool:
    """Whether `exc` says Redis is away or refuses writes for a while (the write may be tried again), not that this
    write would fail again (a permission, a key of another type, a script error: permanent)."""
    if isinstance(exc, _ANSWERS_LATER):
        return True
    return type(exc) is ResponseError and str(exc).split(" ", 1)[0] in _ANSWERS_LATER_CODES


T = TypeVar("T")

_INT_FIELDS = ("seq", "error_code", "prompt_tokens", "completion_tokens", "attempts", "handed_back")
_FLOAT_FIELDS = ("created_at", "started_at", "first_token_at", "finished_at")


def _number(raw: dict[str, str], name: str, kind: type[int] | type[float], job_id: str) -> int | float | None:
    """Field `name` of a job's raw record as a `kind`, or None where it is absent or no number (a record written by
    another version, or by hand: it raised, and reading the job answered 500); such a field is logged."""
    value = raw.get(name)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        log.warning("job %s: field %s holds %r, which is no %s: read as absent", job_id, name, value[:100],
                    kind.__name__)
        return None


def _sent_again_if_lost(write: Callable[[], T]) -> T:
    """write(), sent once more if its connection broke or timed out before the answer came (the store's client does
    not retry): it may have run, and the scripts sent so answer their own second try as they answered the first.
    A second failure is raised: Redis is away, not just one answer."""
    try:
        return write()
    except (redis.ConnectionError, redis.TimeoutError):
        return write()


def _listed(extra: dict | None) -> bool:
    """Whether a new job enters its owner's list (GET /v1/jobs): not a batch's line (its record names the batch),
    which its batch lists (GET /v1/batches/{id}/lines); a batch of 50,000 lines would bury the owner's other jobs."""
    return not (extra and "batch" in extra)


def owner_id(api_key_digest: str) -> str:
    """The short form of an API key's digest kept in job records and key names (never the key itself)."""
    return api_key_digest[:16]


def new_job_id() -> str:
    """A fresh job id (a UUID4 hex string)."""
    return uuid.uuid4().hex


def wrong_type(answer: object) -> bool:
    """Whether a Redis answer (an error raised, or one a pipeline or script answers in its place) is the WRONGTYPE
    of a key that holds another type than the command's: damage to that key, not a Redis away."""
    return isinstance(answer, ResponseError) and str(answer).startswith("WRONGTYPE")


class DamagedRecord(ResponseError):
    """A read of a job whose record key holds another type than a hash (a key SET by hand): the WRONGTYPE Redis
    answered, naming the job and the damage (DAMAGED_ERROR; `message` without the code). No job can run or end in
    such a record (_FINISH takes it out of its queue). Told apart so that the API need not answer it as a Redis that
    is away (503, "try again shortly", logged as an outage), which a client polling the job heard for good."""

    def __init__(self, job_id: str, kind: str):
        self.job_id = job_id
        self.message = f"job {job_id}: " + DAMAGED_ERROR.format(f"its key holds a {kind}, not a hash")
        super().__init__(f"WRONGTYPE {self.message}")


@dataclass(frozen=True)
class Ending:
    """How a job ends: its final status, and for failures why."""

    job_id: str
    status: str
    error: str = ""
    error_code: int = 0
    finish_reason: str = ""
    # The job's final count of generated tokens, when the ender knows it (the last step may add none).
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Claim:
    """The sweep's claim of a running job for a new delivery: the job, who held it (a dead worker, or an earlier claim
    or hand-back that lapsed), and when the claim was made. Made again with the same values, it answers as it did
    (`JobStore.claim`)."""

    job_id: str
    holder: str
    at: float

    @property
    def mark(self) -> str:
        """What the running hash holds for the job once claimed."""
        return f"{_REQUEUED}{self.at!r}"


@dataclass(frozen=True)
class Snapshot:
    """A job's text and seq read atomically: what a listener has before it follows the channel."""

    status: str
    prompt: str
    text: str
    seq: int
    error: str
    error_code: int
    finish_reason: str
    tokens: int = 0  # the generated tokens of `text` (written with it by the same script)


@dataclass(frozen=True)
class NewJob:
    """A job to record as `queued` (`JobStore.create_jobs`): its request, queue, and optional deadline, owner
    (an API key digest), extra record fields and id (a new one if None: one the caller chose lets it end the job
    when the write's answer is lost)."""

    request: GenerateRequest
    queue: str
    deadline_seconds: float | None = None
    owner: str | None = None
    extra: dict[str, str | int] | None = None
    job_id: str | None = None


class RedisClock:
    """Redis's clock, read from this host's: time.time() plus the offset of Redis's TIME from it, measured again every
    REFRESH_SECONDS (one round trip). The times the API, the workers and `status` write to a job's record and compare
    (deadlines, the claims' and hand-backs' marks, started and finished times) are on this one clock: each host's own
    clock made a job with a 60 s deadline expire before it started where the worker's clock ran 5 minutes ahead of
    the API's (or the API's behind), as an NTP-less VM drifts. Where Redis does not answer, the last offset stays (0
    before any), and the caller's own command meets the outage."""

    REFRESH_SECONDS = 30.0

    def __init__(self, client: redis.Redis):
        self.redis = client
        self.offset = 0.0
        self._measured_at: float | None = None

    def __call__(self) -> float:
        if self._measured_at is None or time.monotonic() - self._measured_at > self.REFRESH_SECONDS:
            try:
                before = time.time()
                seconds, microseconds = self.redis.time()
                redis_time, after = seconds + microseconds / 1e6, time.time()
                # Redis read its clock between `before` and `after`: every offset in that window fits, and the one
                # nearest 0 is taken (0 where Redis shares this host's clock, as a worker on the API's host does). The
                # window's middle put up to half a round trip of noise on each process's times: a job's started_at
                # (the worker's) came out before its created_at (the API's) on one host. TIME's microseconds widen it.
                self.offset = min(max(0.0, redis_time - after - 1e-6), redis_time - before + 1e-6)
                self._measured_at = time.monotonic()
            except redis.RedisError:
                # Asked again in a second, not at every call: an outage is not waited out twice a command.
                self._measured_at = time.monotonic() - self.REFRESH_SECONDS + 1
        return time.time() + self.offset


class JobStore:
    """Reads and writes job records in Redis. Thread-safe (one redis-py connection pool)."""

    def __init__(self, client: redis.Redis, prefix: str = "llq", ttl_seconds: int = 86400, max_queued: int = 0,
                 max_queued_per_owner: int = 0, max_hand_backs: int = MAX_HAND_BACKS,
                 idempotency_ttl_seconds: int | None = None):
        self.redis = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        # The clock of every time a record holds or is compared with (see RedisClock).
        self.clock = RedisClock(client)
        # How long an Idempotency-Key (and the body it came with) is remembered (Settings.idempotency_ttl_seconds;
        # None: as long as a job record). It was always the records' TTL: the setting was read and never used.
        self.idempotency_ttl_seconds = idempotency_ttl_seconds or ttl_seconds
        # Admission limits on queued jobs across both queues, in all and per API key (0: none).
        self.max_queued = max_queued
        self.max_queued_per_owner = max_queued_per_owner
        # Hand-backs a job may have before its next start fails it (`start`; Settings.max_hand_backs).
        if isinstance(max_hand_backs, bool) or not isinstance(max_hand_backs, int) or max_hand_backs < 0:
            raise ValueError(f"max_hand_backs must be a whole number of at least 0, not {max_hand_backs!r}")
        self.max_hand_backs = max_hand_backs
        self._start = client.register_script(_START)
        self._append = client.register_script(_APPEND)
        self._finish = client.register_script(_FINISH)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._set_prompt = client.register_script(_SET_PROMPT)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._image_damage = client.register_script(_IMAGE_DAMAGE)
        self._check_idempotency = client.register_script(_CHECK_IDEMPOTENCY)
        self._create_keyed = client.register_script(_CREATE_KEYED)
        self._create = client.register_script(_CREATE)
        self._create_cancelled = client.register_script(_CREATE_CANCELLED)
        self._forget_deadlines = client.register_script(_FORGET_DEADLINES)
        self._list_chunk = client.register_script(_LIST_CHUNK)

    @classmethod
    def from_url(cls, url: str, prefix: str = "llq", ttl_seconds: int = 86400, max_queued: int = 0,
                 max_queued_per_owner: int = 0, max_hand_backs: int = MAX_HAND_BACKS,
                 idempotency_ttl_seconds: int | None = None) -> "JobStore":
        """A store on a new connection pool to the Redis at `url`."""
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix, ttl_seconds, max_queued,
                   max_queued_per_owner, max_hand_backs, idempotency_ttl_seconds)

    @property
    def handed_back_error(self) -> str:
        """The error of a job this store's `start` found handed back more than `max_hand_backs` times."""
        return handed_back_error(self.max_hand_backs)

    # Key names: one place, so api/ and workers/ agree.
    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def channel(self, job_id: str) -> str:
        """The pub/sub channel a job's chunks are published to."""
        return f"{self.prefix}:chunks:{job_id}"

    @property
    def control_channel(self) -> str:
        """Where cancellations of running jobs are broadcast to workers (message: the job id)."""
        return f"{self.prefix}:control:cancel"

    def queue_key(self, queue: str) -> str:
        return f"{self.prefix}:queued:{queue}"

    def create(self, request: GenerateRequest, queue: str, job_id: str | None = None, *,
               deadline_seconds: float | None = None, idempotency_key: str | None = None,
               owner: str | None = None) -> tuple[str, bool]:
        """Write a new `queued` record for `request`; returns (job id, created).

        With an `idempotency_key` already used, nothing is written and the first job's id comes
        back with created=False. A job still queued `deadline_seconds` from now will expire. An
        `owner` (the submitting API key's digest) has the job counted against its queued-job quota.
        """
        job_id = job_id or new_job_id()
        if idempotency_key is None:
            order = self.redis.incr(f"{self.prefix}:enqueue_order")
            with self.redis.pipeline(transaction=True) as pipe:
                listed = self._write_queued(pipe, job_id, request, queue, order, deadline_seconds, owner)
                self._write_listed(pipe, {listed} - {None}, self.clock())
                pipe.execute()
            return job_id, True
        # The key is set by the script that writes the record (`create_keyed`): set a round trip before it (SET NX), a
        # connection cut between the two left the key naming a job that did not exist, which every retry was given.
        return self.create_keyed([NewJob(request, queue, deadline_seconds, owner, job_id=job_id)], [idempotency_key])[0]

    def create_keyed(self, jobs: list["NewJob"], idempotency_keys: list[str]) -> list[tuple[str, bool]]:
        """Write a `queued` record for each job under its idempotency key (`idempotency_keys[i]` for `jobs[i]`), in one
        pipelined round trip for them all; returns each key's (job id, created).

        A key that names a job already gives that job (created=False) and nothing is written for it; the same key
        twice in `jobs` gives the first one's job twice. Each job is one script (`_CREATE_KEYED`): its key is never
        set without its record, and two submissions of one key, from any processes, create one job. A job without a
        `job_id` gets a new one; a caller that must end the job should its write's answer be lost chooses it.
        """
        if len(jobs) != len(idempotency_keys):
            raise ValueError(f"{len(jobs)} jobs and {len(idempotency_keys)} idempotency keys")
        calls = [self._create_call(job, job.job_id or new_job_id(), self.idempotency_key(key))
                 for job, key in zip(jobs, idempotency_keys)]
        return [(job_id, bool(created)) for job_id, created in self._run_scripts(calls)]

    def _create_call(self, job: "NewJob", job_id: str, idempotency_key: str | None = None
                     ) -> tuple[Script, list, list]:
        """The script call (script, keys, args) that records `job` as `queued` under `job_id`: `_CREATE_KEYED` under
        an idempotency key (its Redis key), else `_CREATE`."""
        record, now, images = self._queued_record(job_id, job.request, job.queue, job.deadline_seconds, job.owner,
                                                  job.extra)
        keys = [self.order_key, self.key(job_id), self.queue_key(job.queue), self.submitted_key, self.deadlines_key,
                self.list_key(job.owner)]
        if job.owner and self.max_queued_per_owner:
            keys.append(self.owner_key(job.owner))
        args = [job_id, self.idempotency_ttl_seconds if idempotency_key else "", job.queue,
                record.get("deadline", ""), repr(now), self.ttl_seconds if _listed(job.extra) else "", len(images),
                *[item for pair in images.items() for item in pair],
                *[item for pair in record.items() for item in pair]]
        if idempotency_key is None:
            return self._create, keys, args
        return self._create_keyed, [idempotency_key, *keys], args

    def create_cancelled(self, request: GenerateRequest, queue: str, idempotency_key: str,
                         owner: str | None = None) -> tuple[str, bool]:
        """Take `idempotency_key` for a job that is cancelled from the start, unless it names a job already; returns
        (the key's job id, created).

        The record is the one a queued job has once `cancel` ended it (error, error code, finished_at, owner), but it
        is written in one script and never queued: it is counted among the jobs that ended cancelled, not among
        those submitted, nor in the drain rate that a 429's Retry-After is measured from. Safe to send again: a call
        whose answer was lost after it ran answers created=True the second time too.
        """
        job_id = new_job_id()
        record, now, _ = self._queued_record(job_id, request, queue, None, owner)
        record.pop("image_keys", None)  # its images are never stored: a cancelled job holds none
        # seq 1, as for a job `cancel` ended while queued: its end is its one message (none is published: nobody
        # can follow a job whose id was never given out).
        record.update(status="cancelled", seq=1, error=CANCELLED_ERROR, error_code=int(ErrorCode.CANCELLED),
                      finish_reason="cancelled", cancel_requested="1", finished_at=repr(now),
                      request=_IMAGES_RE.sub('"images":[]', record["request"]))  # as _FINISH leaves an ended job's
        fields = [item for pair in record.items() for item in pair]
        keys = [self.idempotency_key(idempotency_key), self.key(job_id), self.finished_key, self.list_key(owner),
                self.idempotency_body_key(idempotency_key)]
        args = [job_id, self.idempotency_ttl_seconds, self.ttl_seconds, f"cancelled:{int(ErrorCode.CANCELLED)}",
                repr(now), self.key(""), *fields]
        job, created = _sent_again_if_lost(lambda: self._create_cancelled(keys=keys, args=args))
        return job, bool(created)

    @property
    def order_key(self) -> str:
        """The counter that orders queued jobs (their score in their queue)."""
        return f"{self.prefix}:enqueue_order"

    def create_many(self, requests: list[GenerateRequest], queue: str, *, deadline_seconds: float | None = None,
                    owner: str | None = None, extra: list[dict[str, str | int]] | None = None) -> list[str]:
        """Write a `queued` record for each request in one pipelined round trip; returns their new ids in order.

        `extra[i]` adds fields to record i (a batch line's batch id and line number, see _FINISH).
        """
        return self.create_jobs([NewJob(request, queue, deadline_seconds, owner, extra[index] if extra else None)
                                 for index, request in enumerate(requests)], transaction=False)

    def create_jobs(self, jobs: list["NewJob"], transaction: bool = True) -> list[str]:
        """Write a `queued` record for each job, in order, in one round trip (one MULTI unless `transaction` is
        False: then each job is a script of its own, `_CREATE`, whole, and a batch's hundreds of lines do not hold
        Redis for the whole write); returns their new ids."""
        if not jobs:
            return []
        ids = [job.job_id or new_job_id() for job in jobs]
        if not transaction:
            self._run_scripts([self._create_call(job, job_id) for job_id, job in zip(ids, jobs)])
            return ids
        last = self.redis.incrby(f"{self.prefix}:enqueue_order", len(jobs))
        with self.redis.pipeline(transaction=True) as pipe:
            listed = {self._write_queued(pipe, job_id, job.request, job.queue, last - len(jobs) + 1 + index,
                                         job.deadline_seconds, job.owner, job.extra)
                      for index, (job_id, job) in enumerate(zip(ids, jobs))}
            self._write_listed(pipe, listed - {None}, self.clock())
            pipe.execute()
        return ids

    def _write_queued(self, pipe, job_id: str, request: GenerateRequest, queue: str, order: int,
                      deadline_seconds: float | None, owner: str | None, extra: dict | None = None) -> str | None:
        """Queue, on `pipe`, the writes that make a new `queued` job: its record, queue entry, counters and entry in
        its owner's list (the same writes as `_QUEUED_WRITES`, but the list's pruning: `_write_listed`, once for
        many jobs); returns that list's key (None for a batch line, not listed)."""
        record, now, images = self._queued_record(job_id, request, queue, deadline_seconds, owner, extra)
        for key, image in images.items():  # before the record: a record is never without its images
            pipe.hsetnx(key, "data", image)
            pipe.hincrby(key, "refs", 1)
        pipe.hset(self.key(job_id), mapping=record)
        pipe.zadd(self.queue_key(queue), {job_id: order})
        pipe.hincrby(self.submitted_key, queue, 1)
        if deadline_seconds is not None:
            pipe.zadd(self.deadlines_key, {job_id: record["deadline"]})
        if owner and self.max_queued_per_owner:
            # Only a quota reads (and prunes) the set: without one it grew by every job of the key, for ever.
            pipe.zadd(self.owner_key(owner), {job_id: now})
        if not _listed(extra):
            return None
        pipe.zadd(self.list_key(owner), {job_id: now})
        return self.list_key(owner)

    def _write_listed(self, pipe, list_keys: set[str], now: float) -> None:
        """Queue, on `pipe`, the pruning of each owner's list that jobs were just added to (as _LISTED_WRITE)."""
        for key in list_keys:
            pipe.zremrangebyscore(key, "-inf", now - self.ttl_seconds)
            pipe.expire(key, self.ttl_seconds)

    def _queued_record(self, job_id: str, request: GenerateRequest, queue: str, deadline_seconds: float | None,
                       owner: str | None, extra: dict | None = None
                       ) -> tuple[dict[str, str | int], float, dict[str, str]]:
        """The record of a new `queued` job, the time it was made, and the images it holds ({image key: image}, to be
        stored with it: `image_key`)."""
        now = self.clock()
        recorded, images = self._recorded_request(request)
        record = {
            "id": job_id,
            "status": "queued",
            "queue": queue,
            "model": request.model or "",
            "prompt": request.prompt or "",
            "request": recorded,
            "text": "",
            "seq": 0,
            "error": "",
            "error_code": 0,
            "finish_reason": "",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "attempts": 0,
            "created_at": repr(now),
            **(extra or {}),
        }
        if deadline_seconds is not None:
            record["deadline"] = repr(now + deadline_seconds)
        if owner:
            record["owner"] = owner_id(owner)
        if images:
            record["image_keys"] = " ".join(images)
        return record, now, images

    def image_key(self, digest: str) -> str:
        """Where an image is stored, by the SHA-256 (hex) of its text: once, however many active jobs hold it.

        A hash: the image (`data`) and how many queued or running jobs hold it (`refs`). A job's record holds the
        digest in the image's place, and the keys of its images (`image_keys`); a job that ends lets go of them
        (_FINISH), and the last one deletes the image. An evaluation asks several questions of each image (GQA about
        30, POPE 3, MME 2), and the same image sent with each was kept once per queued job."""
        return f"{self.prefix}:image:{digest}"

    def image_key_of(self, image: str) -> str:
        """The key `image` is stored under."""
        return self.image_key(image_digest(image))

    def image_damage(self, images: Sequence[str]) -> dict[str, str]:
        """{image: what is damaged in its stored copy} for those of `images` whose copy is damaged (`_IMAGE_DAMAGE`:
        the checks the ending of a job holding them makes), read in one round trip."""
        keys = {image: self.image_key_of(image) for image in images}
        if not keys:
            return {}
        answers = self._image_damage(keys=list(keys.values()),
                                     args=[len(image.encode("utf-8", "surrogatepass")) for image in keys])
        return {image: what for image, what in zip(keys, answers) if what}

    def _recorded_request(self, request: GenerateRequest) -> tuple[str, dict[str, str]]:
        """The request's JSON as recorded, each image replaced by its digest, and {image key: image} for its images."""
        if not request.all_images():
            return request.model_dump_json(exclude_none=True), {}
        data = request.model_dump(mode="json", exclude_none=True)
        images: dict[str, str] = {}

        def stored(image: str) -> str:
            digest = image_digest(image)
            images[self.image_key(digest)] = image
            return digest

        _replace_images(data, stored)
        # Compact, as pydantic writes it: _FINISH and _IMAGES_RE find the images lists as `"images":[`.
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")), images

    def idempotency_key(self, idempotency_key: str) -> str:
        """Where the job created under an Idempotency-Key is remembered."""
        return f"{self.prefix}:idempotency:{idempotency_key}"

    def idempotency_body_key(self, idempotency_key: str) -> str:
        """Where the fingerprint of the body first sent with an Idempotency-Key is kept (api.submission)."""
        return f"{self.prefix}:idempotency-body:{idempotency_key}"

    def check_idempotency(self, fingerprint_key: str, fingerprint: str,
                          idempotency_keys: list[str]) -> tuple[bool, str | None, list[str | None]]:
        """In one round trip: record `fingerprint` (a submission's body) under `fingerprint_key` unless it holds one
        already, and read the job created under each idempotency key (None where it is unused, or names a job whose
        record is gone: the key is let go). Returns (recorded here, the fingerprint recorded before or None, the
        jobs)."""
        keys = [fingerprint_key, *(self.idempotency_key(key) for key in idempotency_keys)]
        recorded, first, jobs = self._check_idempotency(keys=keys, args=[fingerprint, self.idempotency_ttl_seconds,
                                                                        self.key("")])
        return bool(recorded), first, jobs

    def owner_key(self, owner: str) -> str:
        """Sorted set of an API key's queued jobs, written with a quota only: a job leaves it as it starts or ends
        (the start and finish scripts), and one left there anyway (a record deleted by hand) is pruned by
        `owner_queued`."""
        return f"{self.owner_key_prefix}{owner_id(owner)}:queued"

    @property
    def owner_key_prefix(self) -> str:
        """`owner_key` up to the owner id (the start and finish scripts name the set from the record's owner)."""
        return f"{self.prefix}:owner:"

    def list_key(self, owner: str | None) -> str:
        """Sorted set of the jobs an API key (its digest; None: jobs sent without one) submitted, by creation time
        (GET /v1/jobs); batch lines are not in it. Entries older than the records' TTL are dropped as jobs are added,
        and those whose record is gone as the list is read (`list_jobs`)."""
        return f"{self.prefix}:jobs" + (f":{owner_id(owner)}" if owner else "")

    def list_jobs(self, owner: str | None, limit: int, after: str | None = None,
                  status: str | None = None) -> tuple[list[dict[str, Any]], bool, str | None]:
        """The jobs of `owner` (its API key digest; None: those sent without a key), newest first: up to `limit`
        records (as `get_many` reads them: a job whose record is of another type as its DamagedRecord, listed only
        without `status`, since it has none) of the jobs created before job `after` (from the newest if None), only
        those in `status` if given. Returns (records, whether more may follow, the id to pass as `after` for the next
        page).

        At most LIST_SCAN_FACTOR x `limit` jobs of the list are read for one page: past that, a page filtered by
        `status` ends short with more to follow, its cursor the last job read (which may not be in the page). Jobs
        whose record is gone (expired) are skipped and dropped from the list. A cursor no longer in the list (its job
        expired meanwhile) ends the listing, as for batches.
        """
        key, prefix = self.list_key(owner), self.key("")
        budget, read = LIST_SCAN_FACTOR * limit, 0
        records: list[dict[str, Any]] = []
        cursor = after
        while True:
            # One more than the page needs tells whether more follow.
            wanted = min(limit - len(records) if status is None else limit * LIST_SCAN_FACTOR, budget - read)
            chunk = self._list_chunk(keys=[key], args=[cursor or "", wanted + 1, prefix])
            if not chunk:
                return records, False, cursor  # the cursor's job left the list: none after it can be found
            ids, statuses = chunk
            # The jobs of the chunk to show, read in one round trip once the page's end is found.
            shown, full = [], False
            for job_id, job_status in zip(ids, statuses):
                if len(records) + len(shown) == limit or read == budget:
                    full = True
                    break
                read += 1
                if not job_status:
                    continue  # its record is gone (the chunk's script dropped it from the list)
                cursor = job_id
                if status is None or job_status == status:
                    shown.append(job_id)
            # (A record may have expired, or its status changed, since the chunk was read: the page then goes on
            # from the cursor, as it did when each job was read on its own.)
            records += [record for record in self.get_many(shown) if record is not None and (
                status is None or not isinstance(record, DamagedRecord) and record["status"] == status)]
            if full and (len(records) == limit or read == budget):
                return records, True, cursor
            if not full and len(ids) <= wanted:
                return records, False, cursor

    def owner_queued(self, owner: str, at_least: int = 0) -> int:
        """How many of `owner`'s jobs are queued.

        Jobs enter the owner's set when created and are dropped from it here, once seen to have left
        `queued` (started, cancelled, expired, or their record gone): the count is exact after a
        prune, which runs only when the cheap count reaches `at_least`, near the quota.
        """
        key = self.owner_key(owner)
        count = self.redis.zcard(key)
        if count < at_least or count == 0:
            return count
        members = self.redis.zrange(key, 0, -1)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in members:
                pipe.hget(self.key(job_id), "status")
            # A record of another type (a key SET by hand) answers WRONGTYPE: raised, it failed every submission of
            # the key near its quota, for good. No job is queued in it: it leaves the set.
            statuses = pipe.execute(raise_on_error=False)
        for status in statuses:
            if isinstance(status, redis.RedisError) and not wrong_type(status):
                raise status
        gone = [job_id for job_id, status in zip(members, statuses) if status != "queued"]
        if gone:
            self.redis.zrem(key, *gone)
        return count - len(gone)

    @property
    def batch_prefix(self) -> str:
        """Key prefix of batch records (shared/batches.py): a job with a `batch` field is a line of one."""
        return f"{self.prefix}:batch:"

    @property
    def deadlines_key(self) -> str:
        """Sorted set of the waiting jobs that carry a deadline, scored by it: queued ones, and running ones back in a
        queue (handed back, or claimed from a dead worker), scored by the end of their new wait."""
        return f"{self.prefix}:deadlines"

    def expire_overdue(self) -> list[str]:
        """End `expired` every job still queued past its deadline, and every running job back in a queue (handed back,
        or claimed from a dead worker: no worker runs it) past the end of its new wait, which lasts its
        `deadline_seconds` again from when it went back (it keeps the text it has); returns their ids.

        The endings go in pipelined rounds of EXPIRE_ROUND (one script call a job, one round trip a round: a round
        trip a job took 10 s for 10,000 overdue jobs, the lines of a batch whose window passed, and every
        admission under a queue limit, every /metrics scrape and every batch read waited on it)."""
        cutoff = self.clock()
        overdue = self.redis.zrangebyscore(self.deadlines_key, "-inf", cutoff)
        expired = []
        for start in range(0, len(overdue), EXPIRE_ROUND):
            job_ids = overdue[start:start + EXPIRE_ROUND]
            calls = [self._finish_call(Ending(job_id, "expired", "the job waited in the queue past its deadline",
                                              ErrorCode.EXPIRED, "expired"), False, "", only_if_waiting=True)
                     for job_id in job_ids]
            answers = self._run_scripts([(self._finish, call["keys"], call["args"]) for call in calls],
                                        raise_on_error=False)
            later, settled = None, []
            for job_id, answer in zip(job_ids, answers):
                if isinstance(answer, redis.RedisError) and answers_later(answer):
                    later = answer  # Redis away or refusing writes for now: the next sweep tries again
                    continue
                if isinstance(answer, redis.RedisError):
                    # Permanent (a key of another type, a permission denied): it would fail at every sweep, and the
                    # sweep runs before every admission under a queue limit, so every such submission failed with
                    # it, for good.
                    log.error("job %s: its expiry could not be written (%s: %s); it leaves the deadline set "
                              "unexpired", job_id, type(answer).__name__, answer)
                elif answer == "ok":
                    expired.append(job_id)
                settled.append(job_id)  # ended, or no longer waiting (started, cancelled, gone): no deadline to keep
            if settled:
                self._forget_deadlines(keys=[self.deadlines_key], args=[repr(cutoff), *settled])
            if later is not None:
                raise later
        return expired

    @property
    def submitted_key(self) -> str:
        """Hash of queue → jobs ever submitted to it (a counter for metrics)."""
        return f"{self.prefix}:stats:submitted"

    @property
    def finished_key(self) -> str:
        """Hash of "status:error_code" → jobs that ended so (a counter for metrics)."""
        return f"{self.prefix}:stats:finished"

    def totals(self) -> dict[str, Any]:
        """Job counts in one round trip (two when some are requeued): queued (per queue), running, requeued (those of
        the running that no worker runs now: handed back, or claimed from a dead worker, their tasks back in a queue)
        in all and per model ({model: count}, `requeued_per_model`), submitted (per queue), finished (per (status,
        error_code))."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.zcard(self.queue_key(queue))
            pipe.hgetall(self.running_key)
            pipe.hgetall(self.submitted_key)
            pipe.hgetall(self.finished_key)
            *queued, held, submitted, finished = pipe.execute()
        requeued = [job_id for job_id, holder in held.items() if _mark_time(holder) is not None]
        # A record gone meanwhile (ended and expired) is left out.
        models = self._models_of(requeued)
        # A field that is no count (written by hand) is left out: raised, it failed /metrics and `status` for good.
        return {"queued": dict(zip(QUEUES, queued)), "running": len(held), "requeued": len(requeued),
                "requeued_per_model": dict(Counter(model for model in models if model is not None)),
                "submitted": {queue: int(count) for queue, count in submitted.items() if _is_count(count)},
                "finished": {(name.rpartition(":")[0], int(name.rpartition(":")[2])): int(count)
                             for name, count in finished.items()
                             if _is_count(count) and _is_count(name.rpartition(":")[2])}}

    def _models_of(self, job_ids: list[str]) -> list[str | None]:
        """The model each job's record names ('' for none yet; None where the record is gone, or of another type), in
        one round trip. (A record of another type, its WRONGTYPE raised, failed /metrics and `status`, and the orphan
        sweep's every round, the claims of every other dead worker's job with it.)"""
        if not job_ids:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self.key(job_id), "model")
            models = self._damaged_in_place(job_ids, pipe.execute(raise_on_error=False))
        return [None if isinstance(model, DamagedRecord) else model for model in models]

    def finished_per_second(self) -> float:
        """Jobs that ended per second over the last full minute (0.0 when none did)."""
        minute = int(self.clock() // 60) - 1
        return int(self.redis.get(f"{self.prefix}:finished:{minute}") or 0) / 60.0

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record as typed fields (plus `queue_position` while queued), or None if unknown; DamagedRecord for a
        record of another type."""
        try:
            raw = self.redis.hgetall(self.key(job_id))
        except ResponseError as exc:
            raise self._damage_of(job_id, exc) from exc
        return self._typed(job_id, raw)

    def owner_of(self, job_id: str) -> str | None:
        """The owner id a job's record names (None for a job without one, or unknown); DamagedRecord as `get`."""
        try:
            return self.redis.hget(self.key(job_id), "owner")
        except ResponseError as exc:
            raise self._damage_of(job_id, exc) from exc

    def status_of(self, job_id: str) -> str | None:
        """The status a job's record names (None for an unknown job); DamagedRecord as `get`."""
        try:
            return self.redis.hget(self.key(job_id), "status")
        except ResponseError as exc:
            raise self._damage_of(job_id, exc) from exc

    def _damage_of(self, job_id: str, exc: ResponseError) -> ResponseError:
        """`exc`, an error answered for a command on a job's record, as the DamagedRecord it is where the record holds
        another type than a hash (read again: a script's WRONGTYPE may be another key's)."""
        if wrong_type(exc):
            kind = self.redis.type(self.key(job_id))
            if kind not in ("hash", "none"):
                return DamagedRecord(job_id, kind)
        return exc

    def _damaged_in_place(self, job_ids: Sequence[str], answers: list) -> list:
        """`answers` (one a job of `job_ids`, as a pipeline or `_run_scripts` answers them without raising) with the
        error of each job whose record holds another type than a hash as its DamagedRecord; any other error is
        raised: it is no one job's."""
        for index, (job_id, answer) in enumerate(zip(job_ids, answers)):
            if isinstance(answer, ResponseError):
                answers[index] = answer = self._damage_of(job_id, answer)
            if isinstance(answer, redis.RedisError) and not isinstance(answer, DamagedRecord):
                raise answer
        return answers

    def get_many(self, job_ids: list[str]) -> list[dict[str, Any] | DamagedRecord | None]:
        """`get` of each job, their records read in one round trip (a page of `list_jobs` took one a job); a queued
        job's place in its queue, or a deadline passed, takes more. A job whose record is of another type has its
        DamagedRecord in its place, not raised: its WRONGTYPE failed the whole list, a 503 "the job store is
        unavailable" that `llava-queue eval`, polling its jobs by the hundred, retried for 300 s before it stopped."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.key(job_id))
            raws = self._damaged_in_place(job_ids, pipe.execute(raise_on_error=False))
        # The queued jobs' places in their queues, in one more round trip (one a job: 100 for a page of queued ones).
        queued = [(job_id, raw.get("queue", "")) for job_id, raw in zip(job_ids, raws)
                  if isinstance(raw, dict) and raw.get("status") == "queued"]
        positions = dict(zip((job_id for job_id, _ in queued), self.queue_positions(queued)))
        return [raw if isinstance(raw, DamagedRecord) else self._typed(job_id, raw, positions.get(job_id, _UNREAD))
                for job_id, raw in zip(job_ids, raws)]

    def _typed(self, job_id: str, raw: dict[str, str], position: Any = _UNREAD) -> dict[str, Any] | None:
        """`get`'s answer from the record's fields as read (`raw`; empty if the record is gone); `position`, a queued
        job's place in its queue if it was read with the record (else _UNREAD: read here)."""
        if not raw:
            return None
        # A queued job's deadline, or the end of a running job's new wait back in a queue (there only while it is).
        deadline = _number(raw, "deadline" if raw.get("status") == "queued" else "requeue_deadline", float, job_id)
        if raw.get("status") in ACTIVE_STATES and deadline is not None and deadline < self.clock():
            # Expire on read too, so a deadline holds even while no worker is sweeping.
            self.expire_overdue()
            raw = self.redis.hgetall(self.key(job_id))
            position = _UNREAD
        if raw.get("status") != "queued":
            position = None
        elif position is _UNREAD:
            [position] = self.queue_positions([(job_id, raw.get("queue", ""))])
        if raw.get("status") == "queued" and position is None:
            # Taken between the two reads (a start moves the job out of its queue and sets its status in one
            # script): read the record again rather than answer `queued` with no place in a queue.
            raw = self.redis.hgetall(self.key(job_id)) or raw
        record: dict[str, Any] = dict(raw)
        for name in _INT_FIELDS:
            record[name] = _number(raw, name, int, job_id) or 0
        for name in _FLOAT_FIELDS:
            record[name] = _number(raw, name, float, job_id)
        record["queue_position"] = position if record.get("status") == "queued" else None
        return record

    def request_of(self, job_id: str) -> GenerateRequest | None:
        """The validated request a job was submitted with (while it has not ended: an ended job's has no images)."""
        return self.request_and_queue(job_id)[0]

    def request_and_queue(self, job_id: str) -> tuple[GenerateRequest | None, str | None]:
        """The validated request a job was submitted with and the queue it was submitted to, read in one round trip
        (a worker reads both to start every job); (None, None) for an unknown job."""
        raw, queue, image_keys = self.redis.hmget(self.key(job_id), ("request", "queue", "image_keys"))
        if raw is None:
            return None, queue
        if not image_keys:
            return _validated_request(job_id, raw), queue
        # Its images in the place of their digests (`image_key`): one more round trip, for a job with images.
        keys = image_keys.split()
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "data")
            found = dict(zip(keys, pipe.execute()))
        damaged = ValueError(f"job {job_id}: the request its record holds is not one llava-queue writes (the "
                             "record is damaged: changed by hand, or by another program on the key prefix)")
        try:
            data = json.loads(raw)
        except ValueError:
            raise damaged from None

        def image(digest: str) -> str:
            stored = found.get(self.image_key(digest))
            if stored is None:
                raise LookupError(f"job {job_id}: its image {digest[:12]}... is no longer stored")
            return stored

        try:
            _replace_images(data, image)
        except (AttributeError, TypeError):
            # No object, or turns or images that are no lists of them: it failed the job with "AttributeError: 'list'
            # object has no attribute 'get'", and a traceback in the worker's log.
            raise damaged from None
        return _validated_request(job_id, json.dumps(data, ensure_ascii=False)), queue

    def queue_of(self, job_id: str) -> str | None:
        """The queue a job was submitted to (None for an unknown job)."""
        return self.redis.hget(self.key(job_id), "queue")

    def queue_positions(self, jobs: list[tuple[str, str]]) -> list[int | None]:
        """For each (job id, queue) of `jobs`, how many queued jobs will be taken before it (0: it is next; None: it
        is in no queue now), all read in one round trip (a poll of a queued batch job took three, with the record's).

        Interactive jobs are served first, so every queued interactive job is ahead of a batch job. Jobs of every
        model count (the queued set is one per kind): with several models on one Redis it is an upper bound, where
        counting only its model's and the model-less ones would read each job ahead of it at every poll.
        """
        if not jobs:
            return []
        batch = any(queue == "batch" for _, queue in jobs)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, queue in jobs:
                pipe.zrank(self.queue_key(queue), job_id)
            if batch:
                pipe.zcard(self.queue_key("interactive"))
            read = pipe.execute()
        interactive = read.pop() if batch else 0
        return [None if rank is None else rank + (interactive if queue == "batch" else 0)
                for (_, queue), rank in zip(jobs, read)]

    def queue_lengths(self) -> dict[str, int]:
        """Number of queued jobs per queue."""
        with self.redis.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                pipe.zcard(self.queue_key(queue))
            return dict(zip(QUEUES, pipe.execute()))

    def snapshot(self, job_id: str) -> Snapshot | None:
        """Status, prompt, text, its token count and seq read in one round trip, consistent with the channel's seq."""
        fields = ("status", "prompt", "text", "seq", "error", "error_code", "finish_reason", "completion_tokens")
        values = self.redis.hmget(self.key(job_id), fields)
        if values[0] is None:
            return None
        raw = dict(zip(fields, values))
        return Snapshot(raw["status"], raw["prompt"] or "", raw["text"] or "", _number(raw, "seq", int, job_id) or 0,
                        raw["error"] or "", _number(raw, "error_code", int, job_id) or 0, raw["finish_reason"] or "",
                        _number(raw, "completion_tokens", int, job_id) or 0)

    def start(self, job_id: str, worker: str, model: str = "", max_attempts: int = 3, token: str = "",
              max_hand_backs: int | None = None) -> str:
        """Mark a job running on `worker`; a job submitted without a model name gets `model`.

        Returns "running"; "resumed" (its earlier worker died: go on from the text it has);
        "duplicate" (a live worker already runs it: skip this delivery); "other_model" (started by a worker of
        another model, now gone: its text is that model's, so skip this delivery, which its model's queue has too);
        "cancel" or "expired"
        (cancelled, or past its deadline, before it started: the caller ends it so);
        "exhausted" (started more than `max_attempts` times, the starts after a hand-back (`release`) not counted:
        the caller fails it); "handed_back" (handed back more than `max_hand_backs` times, the store's own unless
        given: the caller fails it, with `handed_back_error`);
        with these four a job its dead (or stopping) worker held is the caller's, to end; "damaged" (its record
        has no status of the store's: it is now running on `worker`, which fails it with DAMAGED_STATUS_ERROR);
        "missing"; or the final status it already has (skip).

        A `token` of this delivery's own makes the start safe to send again: one whose answer was lost (the
        connection cut after it ran) gets the same answer the second time, not "duplicate" (its job held by this
        worker, run by nobody, stayed "running" for good).
        """
        return self._start(keys=[self.key(job_id), self.channel(job_id), *self._queue_keys(), self.running_key],
                           args=[worker, repr(self.clock()), job_id, model, f"{self.prefix}:worker:",
                                 max_attempts, token,
                                 self.max_hand_backs if max_hand_backs is None else max_hand_backs,
                                 self.owner_key_prefix])

    @property
    def running_key(self) -> str:
        """Hash of running job id → the worker that holds it."""
        return f"{self.prefix}:running"

    def orphans(self, requeue_after: float = 60.0) -> list[Claim]:
        """Claims to make (`claim`): running jobs whose worker stopped announcing itself (it died), and jobs claimed
        or handed back `requeue_after` seconds ago that no worker has started since, if a live worker serves their
        model: else the task sent with the hand-back or claim still waits in their queue (or is lost, and the claim
        made once a worker of their model is up sends it), and a delivery every minute only piled up messages there
        (1,440 a day for each such job, which the worker that came at last took one by one, each a skipped task)."""
        held = self.redis.hgetall(self.running_key)
        if not held:
            return []
        workers = sorted({holder for holder in held.values() if _mark_time(holder) is None})
        alive = dict(zip(workers, self.redis.mget([f"{self.prefix}:worker:{name}" for name in workers]))) \
            if workers else {}
        now = self.clock()
        claims = []
        for job_id, holder in held.items():
            marked_at = _mark_time(holder)
            if marked_at is not None:
                if now - marked_at < requeue_after:
                    continue
            elif alive.get(holder) is not None:
                continue
            claims.append(Claim(job_id, holder, now))
        again = [claim for claim in claims if _mark_time(claim.holder) is not None]
        if again:
            served = {worker.get("model", "") for worker in WorkerRegistry(self.redis, self.prefix).workers()}
            # A job that names no model yet goes to the queues every worker reads.
            unserved = {claim.job_id for claim, model in zip(again, self._models_of([c.job_id for c in again]))
                        if not served or (model and model not in served)}
            claims = [claim for claim in claims if claim.job_id not in unserved]
        return claims

    def claim(self, claim: Claim) -> bool:
        """Mark a job claimed for a new delivery; False if someone else started or claimed it since `orphans` saw it.

        A claimed job is handed out once, not at every sweep; if no worker has started it `requeue_after` seconds
        later, `orphans` lists it again. The same claim made again (its answer lost, or the delivery that followed
        it failed) answers True as long as the job is still marked by it: the caller delivers the job then, and
        nobody else does. A job whose record is gone (deleted, evicted) leaves the running hash instead (it was
        delivered again every minute).
        """
        keys = [self.running_key, self.key(claim.job_id), self.deadlines_key]
        args = [claim.job_id, claim.holder, claim.mark, _REQUEUED, repr(claim.at)]
        claimed = _sent_again_if_lost(lambda: self._claim(keys=keys, args=args))
        if isinstance(claimed, str):  # the type its record holds instead of a hash: it left the running hash
            log.error("%s; it is no longer counted as running, nor delivered again",
                      DamagedRecord(claim.job_id, claimed).message)
            return False
        return bool(claimed)

    def claim_orphans(self, requeue_after: float = 60.0) -> list[str]:
        """Claim every job `orphans` lists; returns the ids claimed."""
        return [claim.job_id for claim in self.orphans(requeue_after) if self.claim(claim)]

    def release(self, job_id: str, worker: str, over: bool = False) -> bool:
        """Give a running job of `worker` back for a new delivery (a graceful shutdown); False if not held. With
        `over`, a hand-over to workers that can run the job (workers/generation.py): not counted as a hand-back, which
        MAX_HAND_BACKS bounds (a job handed over past it failed "handed back by workers told to stop").

        Safe to send again: a release whose answer was lost (after it ran) answers True again as long as nobody has
        started the job since, and counts one hand-back. A hand-back is not counted against the job's attempts.
        """
        now = self.clock()
        keys = [self.running_key, self.key(job_id), self.deadlines_key]
        args = [job_id, worker, f"{_REQUEUED}{worker}", f"{_REQUEUED}{now!r}", _REQUEUED, repr(now),
                "handed_over" if over else "handed_back"]
        return bool(_sent_again_if_lost(lambda: self._release(keys=keys, args=args)))

    def set_prompt(self, job_id: str, prompt: str, prompt_tokens: int, worker: str) -> bool:
        """Record (and publish) the rendered prompt and its token count; False if the job ended meanwhile or another
        worker holds it now (`worker` was thought dead and its job resumed elsewhere).

        Safe to send again: once per start of the job, a write sent again after its answer was lost is written and
        published once (it was published twice, with a seq of its own).
        """
        seq = self._set_prompt(keys=[self.key(job_id), self.channel(job_id)], args=[prompt, prompt_tokens, worker])
        return int(seq) >= 0

    def finish(self, job_id: str, status: str, *, error: str = "", error_code: int = 0,
               finish_reason: str = "", worker: str = "") -> bool:
        """Move an active job to a final state, publish its last message, and let the record expire.

        A `worker` may only end a job it holds. Returns False if the job had already ended (its
        final state is kept) or another worker holds it, or if it ended failed instead, its record damaged (_FINISH).
        """
        ending = Ending(job_id, status, error, int(error_code), finish_reason)
        return self._finish(**self._finish_call(ending, False, worker)) == "ok"

    def finish_many(self, endings: Sequence["Ending"]) -> list["str | redis.RedisError"]:
        """End each job as `finish` does (no fence: for jobs nobody runs), in one pipelined round trip; returns each
        one's answer: "ok", the final status it had, "missing", "damaged" (failed instead, see _FINISH), or the error
        Redis answered for that job alone.

        A job's error is not raised, so one job Redis refuses (a permission an ACL denies, a record of another type:
        errors that would come again, see `answers_later`) does not leave the others unended; the caller logs them
        and does not try them again. A connection lost (or timed out) is tried once more, as `finish` would be: an
        ending ends a job once. A second loss is raised.
        """
        calls = [(self._finish, call["keys"], call["args"])
                 for call in (self._finish_call(ending, False, "") for ending in endings)]
        return _sent_again_if_lost(lambda: self._run_scripts(calls, raise_on_error=False))

    def record_step(self, worker: str, chunks: list[tuple[str, str, int, bool]],
                    endings: list["Ending"], step: int | None = None) -> list[int]:
        """One engine step of `worker` in one pipelined round trip: append and publish each chunk, then end jobs.

        `chunks` holds (job_id, delta, completion_tokens, first_token). Returns each chunk's new seq; -1
        where the job is no longer running on `worker` (the chunk is dropped), -2 where its cancellation was
        asked for (the chunk is kept), -3 where its record is gone, -4 where it is of another type (RECORD_DAMAGED):
        stop generating it in every case. `step`, increasing with each call of this worker, makes writing the same
        step again harmless: a job whose record has seen that step (or a later one) keeps its text as it is.

        An ending refused because its job's record is of another type (see _FINISH: the job leaves the queues and
        the running hash) is raised only where no job that goes on has a chunk in the call, else logged: raised, it
        told the worker that the whole step was unwritten, and every job with a chunk in it failed.
        """
        now = repr(self.clock())
        keys, args = [], [worker, "" if step is None else step]
        for job_id, delta, completion_tokens, first_token in chunks:
            keys += [self.key(job_id), self.channel(job_id)]
            args += [delta, completion_tokens, now if first_token else ""]
        calls = [(self._append, keys, args)] if chunks else []
        calls += [(self._finish, call["keys"], call["args"])
                  for call in (self._finish_call(ending, False, worker) for ending in endings)]
        # The chunks go before the endings whatever Redis's script cache holds (see _run_scripts' `first_whole`).
        results = self._run_scripts(calls, raise_on_error=False, first_whole=bool(chunks and endings))
        if chunks and isinstance(results[0], Exception):
            raise results[0]
        ended = [ending.job_id for ending in endings]
        damaged = [(ending, answer) for ending, answer in zip(endings, self._damaged_in_place(
            ended, results[1:] if chunks else results)) if isinstance(answer, DamagedRecord)]
        if damaged and all(job_id in ended for job_id, *_ in chunks):
            raise damaged[0][1]
        for ending, answer in damaged:
            log.warning("%s; its ending (%s) is not written, and it is no longer counted as running",
                        answer.message, ending.status)
        return [int(seq) for seq in results[0]] if chunks else []

    def _run_scripts(self, calls: list[tuple[Script, list, list]], raise_on_error: bool = True,
                     first_whole: bool = False) -> list:
        """EVALSHA every (script, keys, args) in order, in one pipelined round trip; their results (a call's error in
        its place with `raise_on_error` False; else the first error is raised, the calls after it having run too).

        A redis-py pipeline that runs scripts first asks Redis whether they are loaded (SCRIPT EXISTS, a round
        trip of its own, before every execute: one more per engine step). This sends EVALSHA at once and only
        after a NOSCRIPT (Redis restarted, or its script cache was flushed) loads the scripts and runs the calls
        again from the first that failed: those before it ran; those after it ran too only if their script was
        loaded, and then a second run changes nothing (a chunk carries its step number, an ending ends a job once)
        unless they depend on the failed one. `first_whole` sends the first call with its script's text (EVAL,
        which never answers NOSCRIPT) where the calls after it must not run before it: a step's endings after its
        chunks. By EVALSHA, a job's last chunk met NOSCRIPT while its ending's script, loaded meanwhile by another
        client (the API cancelling a job), ran: the job ended, and the chunk, run again, was dropped.
        """
        results: list = []
        loaded = False
        while calls:
            with self.redis.pipeline(transaction=False) as pipe:
                for index, (script, keys, args) in enumerate(calls):
                    if first_whole and index == 0:
                        pipe.eval(script.script, len(keys), *keys, *args)
                    else:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                answers = pipe.execute(raise_on_error=False)
            first_whole = False
            failed = next((i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)), len(answers))
            for answer in answers[:failed] if raise_on_error else ():
                if isinstance(answer, Exception):
                    raise answer
            results += answers[:failed]
            if failed < len(calls):
                if loaded:
                    raise answers[failed]
                for script in {script for script, _, _ in calls[failed:]}:
                    script.sha = self.redis.script_load(script.script)
                loaded = True
            calls = calls[failed:]
        return results

    def _queue_keys(self) -> list[str]:
        return [self.queue_key(queue) for queue in QUEUES]

    def _finish_call(self, ending: "Ending", only_if_running: bool, worker: str, only_if_waiting: bool = False) -> dict:
        assert ending.status in FINAL_STATES, ending.status
        now = self.clock()
        # "waiting": queued, or back in a queue past the end of its new wait (see _FINISH).
        required = "running" if only_if_running else "waiting" if only_if_waiting else ""
        finished_counter = f"{self.prefix}:finished:{int(now // 60)}"
        return {"keys": [self.key(ending.job_id), self.channel(ending.job_id), *self._queue_keys(), self.running_key,
                         self.deadlines_key, finished_counter, self.finished_key],
                "args": [ending.status, ending.error, int(ending.error_code), ending.finish_reason, repr(now),
                         required, self.ttl_seconds, ending.job_id, worker,
                         "" if ending.completion_tokens is None else ending.completion_tokens, self.batch_prefix,
                         self.owner_key_prefix]}

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued one ends at once, a running one leaves its batch at the next step.

        Returns the status the job had ("queued", "running", or a final state; as it is, one that is not the store's),
        or None if unknown; "damaged" for one its ending failed instead (_FINISH: a key of its own is damaged);
        DamagedRecord for a record of another type.
        """
        status = self.cancel_many([job_id])[0]
        if isinstance(status, DamagedRecord):
            raise status
        return None if status == "missing" else status

    def cancel_many(self, job_ids: Sequence[str]) -> list[str | DamagedRecord]:
        """Cancel each job as `cancel` does, in two pipelined round trips for them all: ask every one to stop (a
        running one hears it on the control channel), then end those that were queued, and those "running" that no
        worker runs (handed back or claimed from a dead worker, back in a queue: they stayed "running", the cancel
        unheard, until a worker of their model came, if ever). Returns each job's status before ("missing" for an
        unknown one; "queued" for one of those, which ended as a queued one does; "damaged" for one of those ended, or
        a queued one, whose ending failed it instead: see `cancel`). A job whose record is of another type has its
        DamagedRecord in its place, as in `get_many`: its WRONGTYPE, raised, failed the cancel of all the others (a
        batch's, with one line's key SET by hand), those queued left queued."""
        answers = self._damaged_in_place(job_ids, self._run_scripts(
            [(self._request_cancel, [self.key(job_id), self.control_channel, self.running_key], [job_id, _REQUEUED])
             for job_id in job_ids], raise_on_error=False))
        # (One whose record is of another type was asked nothing: its DamagedRecord stands for its status.)
        answers = [(answer, "", "") if isinstance(answer, DamagedRecord) else answer for answer in answers]
        statuses = [status for status, _, _ in answers]
        # If a worker took a queued one meanwhile, its next chunk finds the job ended and drops it. One that no worker
        # ran is ended only while its record still names the holder read: a worker that started it meanwhile aborts
        # it on the cancel's message.
        endings = {job_id: (False, "") if status == "queued" else (True, holder)
                   for job_id, (status, unheld, holder) in zip(job_ids, answers) if status == "queued" or unheld}
        calls = [self._finish_call(Ending(job_id, "cancelled", CANCELLED_ERROR, int(ErrorCode.CANCELLED), "cancelled"),
                                   only_if_running, holder) for job_id, (only_if_running, holder) in endings.items()]
        ended = dict(zip(endings, self._damaged_in_place(list(endings), self._run_scripts(
            [(self._finish, call["keys"], call["args"]) for call in calls], raise_on_error=False))))
        # A job its ending failed instead was answered "queued" (a DELETE's "cancelled"): its cancel is no such thing.
        return [ended[job_id] if isinstance(ended.get(job_id), DamagedRecord)
                else "damaged" if ended.get(job_id) == "damaged"
                else "queued" if ended.get(job_id) == "ok" and endings[job_id][0] else status
                for job_id, status in zip(job_ids, statuses)]


def _replace_images(request: dict[str, Any], replace: Callable[[str], str]) -> None:
    """Replace, in place, each image of a request as JSON data (its `images`, or its turns' images) by replace(it)."""
    for holder in [request, *request.get("messages", ())]:
        if holder.get("images"):
            holder["images"] = [replace(image) for image in holder["images"]]


def _validated_request(job_id: str, raw: str) -> GenerateRequest:
    """The request a job's record holds (`raw`, its JSON), validated; a ValueError that names the job and each field
    that is wrong (at most three) where it is not one. pydantic's own message (a dump of every error, with an address
    to look each one up at) was the job's error, and the record's id was nowhere in it."""
    try:
        return GenerateRequest.model_validate_json(raw)
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'the request'}: {error['msg']}"
                          for error in exc.errors(include_url=False)[:3])
        raise ValueError(f"job {job_id}: the request its record holds is not valid here ({wrong})") from None


def image_digest(image: str) -> str:
    """The SHA-256 (hex) of an image's text: its name in the store (JobStore.image_key)."""
    return hashlib.sha256(image.encode("utf-8", "surrogatepass")).hexdigest()


def glob_escaped(text: str) -> str:
    """`text` matched literally in a Redis MATCH pattern (a KEY_PREFIX such as `llq[staging]` matched no key: the
    brackets were a character class, and every worker was hidden; a `*` could match another deployment's keys)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _is_count(text: str) -> bool:
    """Whether a counter's field reads as a whole number (HINCRBY's)."""
    return re.fullmatch(r"-?[0-9]+", text) is not None


# What the API and `status` read of a worker's description as numbers (workers/main.py writes them).
_WORKER_NUMBERS = ("started_at", "heartbeat_at", "num_running", "num_waiting", "max_num_seqs", "reserved_tokens",
                   "max_batch_tokens", "tokens_per_second")


def _worker_description(value: str) -> dict[str, Any] | None:
    """A worker's description as a worker writes it (an object, its model a string and its times and load figures
    numbers where present), or None. Anything else (written by hand) made /healthz, /metrics, /v1/models and
    `status` fail with a 500 or a traceback for as long as it stayed."""
    try:
        description = json.loads(value)
    except ValueError:
        return None
    if not isinstance(description, dict) or not isinstance(description.get("model", ""), str):
        return None
    numbers = [description[name] for name in _WORKER_NUMBERS if name in description]
    if not all(isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
               for number in numbers):
        return None
    return description


class WorkerRegistry:
    """Workers announce themselves with a short-lived key that they refresh; a dead worker fades out.

    Each announcement also puts the worker's name in a sorted set, scored by when its key lapses, so that
    listing the live workers reads that set and their keys, whatever else the keyspace holds (a SCAN of the
    whole keyspace for the worker keys, as /healthz, /readyz, /metrics and `status` did, grew with the job
    records: 300,000 of them took 0.15-0.8 s a call on localhost).
    """

    def __init__(self, client: redis.Redis, prefix: str = "llq"):
        self.redis = client
        self.prefix = prefix
        # The models-seen times are written by each worker and read by each API: on Redis's clock, not theirs.
        self.clock = RedisClock(client)

    @property
    def names_key(self) -> str:
        """Sorted set of worker names, scored by when each one's announcement lapses."""
        return f"{self.prefix}:workers"

    def key(self, name: str) -> str:
        """A worker's key: its description, alive while it beats."""
        return f"{self.prefix}:worker:{name}"

    @property
    def models_key(self) -> str:
        """Hash of model name -> when a worker of it last announced itself; kept when the workers go, so that a
        model whose workers restart is told from one never served."""
        return f"{self.prefix}:models-seen"

    def announce(self, name: str, info: dict[str, Any], ttl_seconds: int = 15) -> None:
        """Publish (or refresh) a worker's description for `ttl_seconds`; names long lapsed leave the set."""
        now = self.clock()
        with self.redis.pipeline() as pipe:
            pipe.set(self.key(name), json.dumps(info), ex=ttl_seconds)
            pipe.zadd(self.names_key, {name: now + ttl_seconds})
            pipe.zremrangebyscore(self.names_key, "-inf", now - 3600)
            if isinstance(info.get("model"), str):
                pipe.hset(self.models_key, info["model"], now)
            pipe.execute()

    def remove(self, name: str) -> None:
        """Forget a worker at once (on a clean shutdown)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(self.key(name))
            pipe.zrem(self.names_key, name)
            pipe.execute()

    def models_seen(self) -> dict[str, float]:
        """When a worker of each model last announced itself (epoch seconds on `clock`), live or not; a value not a
        number is left out."""
        seen = {}
        for model, at in self.redis.hgetall(self.models_key).items():
            try:
                seen[model] = float(at)
            except ValueError:
                continue
        return seen

    def workers(self) -> list[dict[str, Any]]:
        """Every live worker's description, by name. Reads only: a read-only replica answers it."""
        # The key's own expiry decides: a name whose score has passed is only a candidate that the key confirms
        # or not (a clock step between two hosts must not hide a live worker), and the set stays small, since
        # every announcement drops the names that lapsed an hour ago.
        names = sorted(self.redis.zrange(self.names_key, 0, -1))
        values = self.redis.mget([self.key(name) for name in names]) if names else []
        described = [(name, _worker_description(value)) for name, value in zip(names, values) if value]
        for name, description in described:
            if description is None:
                log.warning("worker %s: its description in Redis is not one a worker writes; left out", name)
        return [description for _, description in described if description is not None]
