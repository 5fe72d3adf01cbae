// Talking to the llava-queue API: submit a job, follow it over the WebSocket gateway (reconnecting
// without losing text), cancel it, read its record, record feedback. URLs are relative to the page,
// so the page also works behind a proxy that serves the API under a path. When the server requires
// API keys, the key the user entered goes as a Bearer token (and as ?api_key= on a WebSocket).

// The original web server's message when the request itself failed.
export const SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**";
export const FINAL_STATES = ["succeeded", "failed", "cancelled", "expired"];
// How often a queued job's place is read: each read counts against a key's per-minute rate limit.
const QUEUE_POLL_MS = 2000;
// A connection that dies without closing (a network drop) tells the socket nothing: with no message for this long
// while the job runs, the job is read over HTTP to tell a quiet job (a long prefill) from a dead socket.
const SILENCE_CHECK_MS = 8000;

const KEY_STORAGE = "llava-queue-api-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";

/** Use `key` for every call from now on (kept for this tab's session only). */
export function setApiKey(key) {
  apiKey = key.trim();
  sessionStorage.setItem(KEY_STORAGE, apiKey);
}

/** An error the API answered (HTTP `status`; 0 for a network failure) with its llava-queue error code, and the
 * seconds its Retry-After asks to wait (429 rate limited or queue full, 503 broker away; else null). */
export class ApiError extends Error {
  constructor(message, code, status = 0, retryAfter = null) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

/** Whether `error` is a refusal that says when to come back (429 rate limited or queue full, 503 broker away): the
 * request, sent again then, is likely taken. */
export const isBusy = (error) => Boolean(error.retryAfter) && (error.status === 429 || error.status === 503);

const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));

/** Seconds from a Retry-After header (seconds or an HTTP date); null without one. */
function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  if (!value) return null;
  const seconds = /^\d+$/.test(value.trim()) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(seconds) ? Math.max(1, Math.ceil(seconds)) : null;
}

export function apiUrl(path) {
  return new URL(path, document.baseURI).href;
}

function wsUrl(path) {
  const url = new URL(path, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (apiKey) url.searchParams.set("api_key", apiKey);
  return url.href;
}

/** Call the API; returns the JSON body, throws ApiError with the body's message and code. `options` go to fetch;
 * its `headers` are sent with the page's own. */
export async function callApi(method, path, body, options = {}) {
  const { headers = {}, ...rest } = options;
  let response;
  try {
    response = await fetch(apiUrl(path), {
      ...rest,
      method,
      headers: {
        ...headers,
        ...(body === undefined ? {} : { "Content-Type": "application/json" }),
        ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(`${SERVER_ERROR_MSG} (${error.message})`, 1);
  }
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = payload && payload.error;
    throw new ApiError(detail ? detail.message : `HTTP ${response.status}`, detail ? detail.code : 1, response.status,
                       retryAfterSeconds(response));
  }
  return payload;
}

/** The served models: `[{id, reads_images, ...}]` (a model that reads no images has its worker ignore them). */
export const listModels = async () => (await callApi("GET", "v1/models")).data;
/** A fresh Idempotency-Key for one submission: 128 random bits in hex (crypto.randomUUID is only there on https or
 * localhost; getRandomValues is everywhere). */
export function newSubmissionKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** Submit a job with Idempotency-Key `key` (see cancelSubmission); returns its id. `options` go to fetch (a
 * `signal` that gives the submission up). */
export const submitJob = async (request, key, options = {}) =>
  (await callApi("POST", "v1/jobs", request, { ...options, headers: { "Idempotency-Key": key } })).id;
/** Cancel the job submitted (or still to be submitted) with Idempotency-Key `key`: for a submission whose answer,
 * and so whose job id, has not come. The API takes the key if no job has it yet, so a submission that reaches it
 * after this cancel makes no job. */
export const cancelSubmission = (key, options = {}) =>
  callApi("POST", "v1/jobs/cancel", undefined, { ...options, headers: { "Idempotency-Key": key } });
export const getPageConfig = () => callApi("GET", "page/config");
export const getJob = (id) => callApi("GET", `v1/jobs/${encodeURIComponent(id)}`);
export const cancelJob = (id, options) => callApi("DELETE", `v1/jobs/${encodeURIComponent(id)}`, undefined, options);
export const sendFeedback = (type, jobId) => callApi("POST", "v1/feedback", { type, job_id: jobId });

/**
 * Follow job `id` until it ends. Handlers (all optional):
 *   onConnected()            the socket is open (again)
 *   onQueued(position)       while it waits: how many jobs are ahead of it (null: being handed to a worker)
 *   onStarted()              it left the queue (a worker took it), before its first text
 *   onText(text)             the answer so far (without the prompt), after every chunk
 *   onError(text, code)      an error chunk before the end (error_code != 0): its text (without the prompt); the
 *                            job is still followed to its end
 *   onReconnecting(attempt)  the socket dropped; it is opened again after a short wait
 *   onDone(job, ending)      the job's final record (or null if unreadable) and the last message
 * Returns `{close()}` to stop following (the job itself goes on).
 *
 * Each socket message carries the prompt followed by everything generated so far, and a socket
 * opened again first sends the current text, so a reconnect loses nothing. The prompt (rendered
 * by the worker) is read once from the job record. A socket that has said nothing for SILENCE_CHECK_MS while the job
 * runs is checked against the job record: a job that ended is finished from it, and a socket that missed text (or a
 * network that is down) is given up and opened again, as one that closed.
 */
export function followJob(id, handlers) {
  let socket = null;
  let closed = false;
  let attempt = 0;
  let prompt = null;
  let promptRequest = null;
  let latest = null;
  let pollTimer = null;
  let retryTimer = null;
  let silenceTimer = null;
  let running = false; // the job has left the queue: from then on, a silent socket is checked
  let heard = 0; // messages the socket has had

  const emitText = () => {
    if (latest === null || prompt === null || closed) return;
    if (latest.startsWith(prompt)) handlers.onText?.(latest.slice(prompt.length));
  };
  const learnPrompt = () => {
    promptRequest ??= getJob(id).then((job) => { prompt = job.prompt; emitText(); })
      .catch((error) => {
        // Asked again once its Retry-After has passed (a 429), or QUEUE_POLL_MS after any other failure (a 5xx, the
        // network), message or not: never with the next message (a message comes with every token: each would be one
        // more refused request).
        const wait = error.retryAfter || QUEUE_POLL_MS / 1000;
        promptRequest = sleep(wait).then(() => {
          promptRequest = null;
          if (!closed && prompt === null) learnPrompt();
        });
      });
  };

  const pollQueue = async () => {
    if (closed || latest !== null) return;
    let wait = QUEUE_POLL_MS;
    try {
      const job = await getJob(id);
      if (closed || latest !== null) return;
      if (FINAL_STATES.includes(job.status)) {
        // It ended without leaving the queue (cancelled, expired, failed as it was taken) and the socket has not
        // said so (it may be silent for good): not a job that started.
        finish({ done: true, status: job.status, error: job.error, error_code: job.error_code }, job);
        return;
      }
      if (job.status !== "queued") {
        handlers.onStarted?.(); // no place to show any more, though its first text may take a while
        running = true;
        armSilenceCheck();
        return;
      }
      handlers.onQueued?.(job.queue_position);
    } catch (error) {
      // The socket reports what matters; polling only adds the queue place. A 429 says when to ask again.
      if (error.retryAfter) wait = Math.max(wait, error.retryAfter * 1000);
    }
    if (!closed) pollTimer = setTimeout(pollQueue, wait);
  };

  const finish = async (ending, job = undefined) => {
    if (closed) return;
    stop();
    handlers.onDone?.(job === undefined ? await finalRecord() : job, ending);
  };

  // The ended job's record (null if unreadable). When the answer has no text without it (its prompt never came), it
  // is asked for once more: after a 429's Retry-After, or QUEUE_POLL_MS after a failure that may pass (a 5xx, the
  // network). Otherwise the answer ends with what it streamed, and without its timings.
  const finalRecord = async () => {
    try {
      return await getJob(id);
    } catch (error) {
      const refused = error.status >= 400 && error.status < 500 && error.status !== 429; // asked again, the same
      if (prompt !== null || refused) return null;
      await sleep(error.retryAfter || QUEUE_POLL_MS / 1000);
      return getJob(id).catch(() => null);
    }
  };

  // Before opening the socket again: the job may have ended meanwhile, or the server may refuse us
  // (a refused WebSocket handshake looks like a dropped one to the browser).
  const reconnect = async () => {
    if (closed) return;
    try {
      const job = await getJob(id);
      if (FINAL_STATES.includes(job.status)) {
        finish({ done: true, status: job.status, error: job.error, error_code: job.error_code }, job);
        return;
      }
    } catch (error) {
      if (error.status >= 400 && error.status < 500 && error.status !== 429) {
        finish({ done: true, status: "failed", error: error.message, error_code: error.code }, null);
        return;
      }
    }
    connect();
  };

  const armSilenceCheck = () => {
    clearTimeout(silenceTimer);
    if (!closed && running) silenceTimer = setTimeout(checkSilence, SILENCE_CHECK_MS);
  };

  // The socket has been silent for SILENCE_CHECK_MS while the job runs: the record says whether it missed anything.
  const checkSilence = async () => {
    const [watched, before] = [socket, heard];
    let job;
    try {
      job = await getJob(id);
    } catch (error) {
      // A message came meanwhile (the socket is alive), or the socket closed by itself (it is being opened again).
      if (closed || heard !== before || socket !== watched || socket.readyState !== WebSocket.OPEN) return;
      // The network is down, or the job is gone (the reconnection says why): as for a socket that closed. A busy
      // server (429, 5xx) is asked again later.
      if (error.status === 0 || (error.status >= 400 && error.status < 500 && error.status !== 429)) {
        dropSocket();
      } else {
        silenceTimer = setTimeout(checkSilence, Math.max(SILENCE_CHECK_MS, (error.retryAfter || 0) * 1000));
      }
      return;
    }
    if (closed || heard !== before || socket !== watched || socket.readyState !== WebSocket.OPEN) return;
    if (FINAL_STATES.includes(job.status)) {
      finish({ done: true, status: job.status, error: job.error, error_code: job.error_code }, job);
    } else if (job.prompt + job.text !== (latest ?? job.prompt)) {
      dropSocket(); // the job went on without the socket saying so
    } else {
      armSilenceCheck(); // only quiet (a long prompt or image being read)
    }
  };

  const socketClosed = () => {
    if (closed) return;
    clearTimeout(silenceTimer);
    attempt += 1;
    handlers.onReconnecting?.(attempt);
    retryTimer = setTimeout(reconnect, Math.min(250 * 2 ** attempt, 5000));
  };

  // Give the socket up without waiting for its close: that of a dead connection may never come.
  const dropSocket = () => {
    socket.onopen = socket.onmessage = socket.onclose = null;
    socket.close();
    socketClosed();
  };

  const connect = () => {
    if (closed) return;
    socket = new WebSocket(wsUrl(`v1/jobs/${encodeURIComponent(id)}/ws`));
    socket.onopen = () => {
      handlers.onConnected?.();
      armSilenceCheck();
    };
    socket.onmessage = (event) => {
      heard += 1;
      const message = JSON.parse(event.data);
      if (message.done && message.status === "unavailable") {
        // The API lost Redis: the job goes on at its worker. Follow it again (the record first) once Redis is back.
        dropSocket();
        return;
      }
      attempt = 0;
      if (message.done) {
        // Its text too: the job record read next may be refused (a 429), and the answer would lose its end.
        if (message.text) latest = message.text;
        emitText();
        finish(message);
        return;
      }
      running = true;
      armSilenceCheck();
      if (message.error_code) {
        // The original worker's way to say it failed: the chunk's text is the error, not the answer.
        const text = prompt !== null && message.text.startsWith(prompt) ? message.text.slice(prompt.length)
          : message.text;
        handlers.onError?.(text.trim() || "the server reported an error", message.error_code);
        return;
      }
      latest = message.text;
      if (prompt !== null && !latest.startsWith(prompt)) {
        prompt = null; // the worker rendered the prompt again (a redelivered job): read it again
        promptRequest = null;
      }
      if (prompt === null) learnPrompt();
      emitText();
    };
    socket.onclose = socketClosed;
  };

  const stop = () => {
    closed = true;
    clearTimeout(pollTimer);
    clearTimeout(retryTimer);
    clearTimeout(silenceTimer);
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close();
  };

  connect();
  pollQueue();
  return { close: stop };
}
