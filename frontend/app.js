// The chat page: the conversation lives here, in the browser, and every turn is sent as
// `messages` (the worker renders them with the model's template). Answers stream over the
// WebSocket gateway; the original web server's controls, limits and button states are kept.

import { renderMarkdown } from "./markdown.js";
import { processImage, readImage } from "./images.js";
import {
  FINAL_STATES, cancelJob, cancelSubmission, followJob, getPageConfig, isBusy, listModels, newSubmissionKey,
  sendFeedback, setApiKey, submitJob,
} from "./jobs.js";

// The original web server cuts a message to 1536 characters, 1200 when it carries an image.
const MAX_TEXT = 1536;
const MAX_TEXT_WITH_IMAGE = 1200;
const CURSOR = "▌";
const MODEL_RETRY_MS = 3000;
// The served models change (a worker stops for good, another model comes): the list is read again this often, and
// at most every MODEL_CHECK_WHILE_WAITING_MS while an answer has waited that long for a worker.
const MODEL_REFRESH_MS = 30_000;
const MODEL_CHECK_WHILE_WAITING_MS = 5000;
const STOPPING = "stopping…";
// Stop waits this long for a submission still unanswered (its answer names the job to cancel), then gives it up: the
// answer ends as stopped and its job is cancelled by the submission's Idempotency-Key. A network that dropped the
// submission silently left the answer "stopping…" for good.
const STOP_WAITS_FOR_SUBMISSION_MS = 3000;
// One answer at a time, as the original: Enter while one is generated keeps the message in the box, and says why.
const BUSY_NOTICE = "An answer is still being generated: your message stays in the box. Send it once the answer "
  + "has ended, or press Stop.";
// Enter once Stop (or Escape) was pressed: the message goes as soon as the answer has stopped. Enter pressed right
// after Stop comes before the server has ended the answer: the message stayed in the box, and the notice above asked
// for the Stop just pressed.
const SEND_ONCE_STOPPED_NOTICE = "The answer is stopping: your message is sent as soon as it has stopped.";
// Enter with no model to send to keeps the message too, and says why (the model field's text, after it).
const NO_MODEL_NOTICE = "Your message stays in the box: there is no model to send it to";
// Enter while an image was read that could not be taken (its error says why: in the image panel, or on a phone over
// the message box).
const IMAGE_REFUSED_NOTICE = "Your message stays in the box: the image was not taken (its error says why).";
// The most pixels an image may have is the API's (LLAVA_QUEUE_MAX_IMAGE_PIXELS), read from the server; its default
// when it cannot be read (an image past a smaller limit is then refused by the API, with its own message).
const DEFAULT_MAX_IMAGE_PIXELS = 50_000_000;
const pageConfig = getPageConfig().catch(() => ({ max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS }));

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), conversation: $("conversation"), emptyNote: $("empty-note"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), upvote: $("upvote"), downvote: $("downvote"),
  flag: $("flag"), regenerate: $("regenerate"), clear: $("clear"), notice: $("notice"), image: $("image"),
  preview: $("preview"), dropzone: $("dropzone"), attachment: $("attachment"), attachmentThumb: $("attachment-thumb"),
  attachmentName: $("attachment-name"), attachmentWarning: $("attachment-warning"), removeImage: $("remove-image"),
  attach: $("attach"), examples: document.querySelectorAll(".example"),
  temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"), keyField: $("key-field"),
  apiKey: $("api-key"), imageError: $("image-error"),
};

const state = {
  // {role: "user", text, image: {source, mode, sent: {mode, base64, dataUrl}} | null}
  // {role: "assistant", text, jobId, model, imageNote, started, status, error, errorCode, meta, voted, stopRequested,
  //  position, modelGone}
  turns: [],
  models: new Map(), // the served models by name, as GET /v1/models lists them: {id, reads_images}
  pendingImage: null, // {source, name}
  imageReading: null, // while an image is being read: the promise of its reading (it never rejects)
  sendOnceRead: false, // Send was pressed while it was
  sendOnceStopped: false, // Enter was pressed while the answer was stopping
  current: null, // the assistant turn being generated
  follower: null,
};

// ---- the conversation on screen -------------------------------------------------------------

function renderConversation() {
  // A turn already on screen keeps its element: one put back would be read out again by a screen reader (the whole
  // conversation at every message, an earlier answer's error as a new alert).
  const elements = state.turns.map((turn) => turn.el);
  for (const child of [...ui.conversation.children]) {
    if (!elements.includes(child)) child.remove();
  }
  if (!state.turns.length) ui.conversation.append(ui.emptyNote);
  for (const turn of state.turns) {
    if (!turn.el) {
      turn.el = turn.role === "user" ? userElement(turn) : assistantElement();
      ui.conversation.append(turn.el);
      if (turn.role === "assistant") updateAssistant(turn);
    } else if (turn.image && turn.image.sent) {
      showSentImage(turn.el, turn.image); // Regenerate sends the image again in the current process mode
    }
  }
  showImageWarnings();
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function userElement(turn) {
  const el = document.createElement("div");
  el.className = "turn user";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (turn.image) {
    const img = document.createElement("img");
    img.className = "upload";
    img.alt = "user upload image";
    const note = document.createElement("p");
    note.className = "image-note";
    bubble.append(img, note);
  }
  const text = document.createElement("div");
  text.className = "markdown";
  text.innerHTML = renderMarkdown(turn.text.replaceAll("<image>", "").trim());
  bubble.append(text);
  el.append(bubble);
  if (turn.image && turn.image.sent) showSentImage(el, turn.image);
  return el;
}

/** The user turn `el` shows `image` as it was sent (its src set only when it differs: no needless change). */
function showSentImage(el, image) {
  const img = el.querySelector("img.upload");
  if (img.getAttribute("src") !== image.sent.dataUrl) img.src = image.sent.dataUrl;
}

function assistantElement() {
  const el = document.createElement("div");
  el.className = "turn assistant";
  el.innerHTML = '<div class="bubble"><p class="answer-note"></p><div class="markdown"></div>'
    + '<div class="error" role="alert" hidden></div></div><div class="meta"></div>';
  return el;
}

function updateAssistant(turn) {
  const el = turn.el;
  if (!el) return;
  const stick = ui.conversation.scrollHeight - ui.conversation.scrollTop - ui.conversation.clientHeight < 40;
  const streaming = turn === state.current;
  el.dataset.status = turn.status;
  if (turn.jobId) el.dataset.jobId = turn.jobId;
  // Only once a worker has taken the job: an answer refused, cancelled or failed before any worker had it was made
  // without the image by no model at all.
  setText(el.querySelector(".answer-note"), turn.started ? turn.imageNote : "");
  // As the original: the answer is shown stripped, with the cursor while it streams.
  const rendered = document.createElement("template");
  rendered.innerHTML = renderMarkdown(turn.text.trim());
  if (streaming) lastBlock(rendered.content).append(cursorElement());
  patchChildren(el.querySelector(".markdown"), rendered.content);
  const error = el.querySelector(".error");
  error.hidden = !turn.error;
  error.classList.toggle("cancelled", turn.status === "cancelled");
  // Markdown, as the original's chat shows an error (its network error is bold: its asterisks were shown), and as
  // safe as an answer.
  const shown = document.createElement("template");
  if (turn.error) shown.innerHTML = renderMarkdown(`${turn.error} (error_code: ${turn.errorCode})`);
  patchChildren(error, shown.content);
  // A Stop is shown at once, whatever the answer was showing (a submission still unanswered: "sending…"). Markdown,
  // as an error is: a Stop that cannot reach the server says so with the network error, whose asterisks were shown.
  const meta = document.createElement("template");
  meta.innerHTML = renderMarkdown(streaming && turn.stopRequested ? STOPPING : turn.meta || "");
  patchChildren(el.querySelector(".meta"), meta.content);
  if (stick) ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

/** Make `box`'s children those of `fresh` (a fragment, emptied), keeping each node that is already right and the
 * start of a text that grew: a node replaced drops the user's selection in it, and every chunk of a streaming answer
 * cleared what the user had selected in it to copy. */
function patchChildren(box, fresh) {
  const wanted = [...fresh.childNodes];
  for (const [index, node] of wanted.entries()) {
    const old = box.childNodes[index];
    if (old && old.isEqualNode(node)) continue;
    if (!old) {
      box.append(node);
    } else if (old.nodeType === Node.TEXT_NODE && node.nodeType === Node.TEXT_NODE) {
      if (node.data.startsWith(old.data)) old.appendData(node.data.slice(old.data.length));
      else old.data = node.data;
    } else if (sameTag(old, node)) {
      patchChildren(old, node);
    } else {
      old.replaceWith(node);
    }
  }
  while (box.childNodes.length > wanted.length) box.lastChild.remove();
}

/** Whether elements `a` and `b` differ at most in their children. */
function sameTag(a, b) {
  if (a.nodeType !== Node.ELEMENT_NODE || b.nodeType !== Node.ELEMENT_NODE || a.tagName !== b.tagName) return false;
  const names = a.getAttributeNames();
  return names.length === b.getAttributeNames().length
    && names.every((name) => a.getAttribute(name) === b.getAttribute(name));
}

/** Set `el`'s text only when it changes: the same text set again is a new node, and a selection in it is lost. */
function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// The blocks of rendered markdown the cursor may go into (a table's: its last cell); inside the others (a link, bold
// text, inline code) it would take their look.
const CURSOR_HOSTS = new Set(["P", "UL", "OL", "LI", "BLOCKQUOTE", "PRE", "H3", "H4", "H5", "H6", "TABLE", "THEAD",
  "TBODY", "TR", "TH", "TD"]);

/** The innermost block that rendered markdown `box` ends with (`box` itself when it ends with none, or with a rule):
 * the cursor goes at its end. It is put in after the text is rendered: written into the text, it made a fence line
 * ("```python▌") no fence, and the answer showed its backticks until the next line came. */
function lastBlock(box) {
  let host = box;
  for (let last = host.lastElementChild; last; last = host.lastElementChild) {
    const block = CURSOR_HOSTS.has(last.tagName) || (last.tagName === "CODE" && host.tagName === "PRE");
    if (!block) break;
    host = last;
  }
  return host;
}

/** The cursor, drawn and not read out (a screen reader would say "left half block"). */
function cursorElement() {
  const cursor = document.createElement("span");
  cursor.className = "cursor";
  cursor.setAttribute("aria-hidden", "true");
  cursor.textContent = CURSOR;
  return cursor;
}

function notice(text) {
  ui.notice.textContent = text;
}

/** A notice that carries an API error's message: markdown, as an answer's error is shown (the network error's is
 * bold). */
function noticeMarkdown(text) {
  ui.notice.innerHTML = renderMarkdown(text);
}

// ---- buttons, as the original enables them ---------------------------------------------------

function lastAnswer() {
  const last = state.turns.at(-1);
  return last && last.role === "assistant" ? last : null;
}

function updateButtons() {
  const focused = document.activeElement;
  const busy = state.current !== null;
  const answer = lastAnswer();
  ui.send.disabled = busy || !ui.model.value;
  ui.send.title = busy ? "An answer is being generated: wait for it to end, or press Stop" : "";
  ui.stop.disabled = !busy || Boolean(state.current.stopRequested); // a Stop heard is not asked for again
  ui.regenerate.disabled = busy || !answer || !ui.model.value;
  ui.clear.disabled = busy || state.turns.length === 0;
  const canVote = !busy && answer && answer.status === "succeeded" && !answer.voted;
  // An example replaces the message box's text: not while an answer streams, when the next message is written (as
  // the original disables its buttons then).
  for (const button of ui.examples) button.disabled = busy;
  for (const button of [ui.upvote, ui.downvote, ui.flag]) button.disabled = !canVote;
  // A button that disabled itself as it was used (Send, Regenerate, a vote) dropped the keyboard focus to the page's
  // start: it goes to Stop while an answer runs, else to the message box.
  if (focused instanceof HTMLButtonElement && focused.disabled) {
    (busy && !ui.stop.disabled ? ui.stop : ui.prompt).focus();
  }
}

// ---- sending and streaming ---------------------------------------------------------------------

function processMode() {
  return document.querySelector('input[name="process-mode"]:checked').value;
}

async function send() {
  if (state.current) {
    state.sendOnceStopped = Boolean(state.current.stopRequested);
    notice(state.sendOnceStopped ? SEND_ONCE_STOPPED_NOTICE : BUSY_NOTICE);
    return;
  }
  if (!ui.model.value) {
    // The model field says why there is none to choose: not served, the list not read yet, an API key needed.
    notice(`${NO_MODEL_NOTICE} (${ui.model.selectedOptions[0].text}).`);
    return;
  }
  if (state.imageReading) {
    // A large image takes a moment to read: the message waits for it (sent once, however often Enter is pressed),
    // and stays in the box if the image could not be read (its error says why).
    if (state.sendOnceRead) return;
    state.sendOnceRead = true;
    notice("Reading the image…");
    await state.imageReading;
    state.sendOnceRead = false;
    // Another image picked meanwhile: the reading awaited attached nothing, and the message waits for the new one.
    if (state.pendingImage || state.imageReading) send();
    else notice(ui.imageError.textContent ? IMAGE_REFUSED_NOTICE : "");
    return;
  }
  const image = state.pendingImage;
  let text = ui.prompt.value;
  if (!text.trim() && !image) return; // the original skips an empty message (and sends a blank one: not here)
  // Cut in characters (code points), as the original counts them: a cut in UTF-16 units could split an emoji
  // in two, and the API refuses half of one.
  const limit = image ? MAX_TEXT_WITH_IMAGE : MAX_TEXT;
  const characters = Array.from(text);
  const notes = [];
  if (characters.length > limit) {
    text = characters.slice(0, limit).join("");
    notes.push(`The message was cut to its first ${limit} characters, as the original's page cuts it.`);
  }
  if (image && state.turns.some((turn) => turn.image)) {
    // One image per conversation, as the original: a new image starts a new conversation.
    state.turns = [];
    notes.push("A new image starts a new conversation.");
  }
  notice(notes.join(" "));
  state.turns.push({ role: "user", text, image: image ? { source: image.source, mode: processMode() } : null });
  ui.prompt.value = "";
  setPendingImage(null);
  await generate();
}

// Python's whitespace, which the original's str.strip() takes off an answer before it goes back into the
// conversation: JavaScript's trim() also takes U+FEFF, and leaves U+001C-U+001F and U+0085 (a byte of the next
// prompt would differ).
const PY_SPACE = "[\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const PY_STRIP = new RegExp(`^${PY_SPACE}+|${PY_SPACE}+$`, "gu");
const pyStrip = (text) => text.replace(PY_STRIP, "");

async function messagesToSend() {
  const messages = [];
  for (const turn of state.turns.slice(0, -1)) {
    if (turn.role === "assistant") {
      // An empty answer would be rendered as the open assistant turn ("ASSISTANT:USER: ..."): as the original, an
      // answer that ended without text stays in the conversation as what the page shows for it, its error.
      const text = pyStrip(turn.text) || (turn.error ? `${turn.error} (error_code: ${turn.errorCode})` : "");
      messages.push({ role: "assistant", text });
      continue;
    }
    const message = { role: "user", text: turn.text, images: [] };
    if (turn.image) {
      if (!turn.image.sent || turn.image.sent.mode !== turn.image.mode) {
        turn.image.sent = { mode: turn.image.mode, ...(await processImage(turn.image.source, turn.image.mode)) };
      }
      message.images.push(turn.image.sent.base64);
    }
    messages.push(message);
  }
  return messages;
}

async function generate() {
  const model = ui.model.value;
  // Said on the answer itself, for good: the note under the image follows the model chosen for the next message, and
  // with a LLaVA model chosen again, an earlier answer that never saw the image passed for one that did.
  const imageNote = state.turns.some((turn) => turn.image) && !readsImages(model)
    ? `Answered without seeing the image: ${model} does not read images.` : "";
  // (submission: aborted by a Stop it leaves unanswered, stopCurrent)
  const turn = { role: "assistant", text: "", model, imageNote, started: false, status: "submitting", jobId: null,
                 error: "", meta: "sending…", submission: new AbortController() };
  state.turns.push(turn);
  state.current = turn;
  // The log is busy while the answer streams: a screen reader would read it out again, whole, at every chunk (and
  // every second of a countdown). It reads the answer once, as it ends (finish).
  ui.conversation.setAttribute("aria-busy", "true");
  let messages;
  try {
    messages = await messagesToSend();
  } catch (error) {
    renderConversation();
    finish(turn, null, { status: "failed", error: `could not prepare the image: ${error.message}`, error_code: 4 });
    return;
  }
  renderConversation();
  updateButtons();
  const request = {
    model,
    messages,
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
    max_new_tokens: Number(ui.maxTokens.value),
  };
  turn.jobId = await submitWhenTaken(turn, request);
  if (!turn.jobId) return;
  turn.status = "queued";
  turn.queuedAt = Date.now();
  turn.position = null;
  turn.meta = waitingText(turn);
  updateAssistant(turn);
  if (turn.stopRequested) stopCurrent();
  state.follower = followJob(turn.jobId, {
    onConnected() {
      if (turn.meta.startsWith("connection lost")) {
        turn.meta = turn.status === "running" ? "generating…" : waitingText(turn);
      }
      updateAssistant(turn);
    },
    onQueued(position) {
      turn.position = position;
      turn.meta = waitingText(turn);
      updateAssistant(turn);
      // A job that waits long may be for a model no worker serves any more: the model list says so (showModels).
      const now = Date.now();
      if (now - turn.queuedAt >= MODEL_CHECK_WHILE_WAITING_MS && now - modelsAskedAt >= MODEL_CHECK_WHILE_WAITING_MS) {
        loadModels();
      }
    },
    onStarted() {
      turn.started = true;
      // Its place is gone once a worker has it, whenever its first text comes (a long prompt or an image takes a
      // while).
      if (turn.status !== "queued") return;
      turn.status = "running";
      turn.meta = "generating…";
      updateAssistant(turn);
    },
    onError(text, code) {
      turn.started = true; // (a worker's error chunk)
      turn.error = text;
      turn.errorCode = code;
      updateAssistant(turn);
    },
    onText(text) {
      // The job went on past an error chunk: the error no longer says how the answer goes.
      if (turn.error && text !== turn.text) turn.error = "";
      turn.started = true;
      turn.status = "running";
      turn.text = text;
      turn.meta = "generating…";
      updateAssistant(turn);
    },
    onReconnecting(attempt) {
      turn.meta = `connection lost; reconnecting (attempt ${attempt})…`;
      updateAssistant(turn);
    },
    onDone(job, ending) {
      finish(turn, job, ending);
    },
  });
}

/** What a queued answer shows: its place in the queue, or that no worker serves its model now. */
function waitingText(turn) {
  if (turn.modelGone) {
    return `no worker serves ${turn.model} now: the job waits until one comes back (Stop gives up; another model `
      + "can be chosen at the top)";
  }
  // No place while a worker is taking it (it has left the queue's order, not yet started).
  const position = turn.position;
  return position === null ? "waiting for a worker…"
    : position === 0 ? "in the queue: next" : `in the queue: ${position} ahead`;
}

/**
 * Submit `request`. A 429 (rate limited, queue full) or a 503 (broker away) that says when to come back is sent again
 * then, by itself, the wait counted down on the answer: no job was made, so a user would only send it again. Stop
 * gives up. Returns the job id, or null once the answer has ended.
 */
async function submitWhenTaken(turn, request) {
  // One key for the turn: a refused submission (429, 503) made no job, and its key stays free for the next try.
  const key = newSubmissionKey();
  for (;;) {
    try {
      return await submitUnanswered(request, key, turn.submission.signal);
    } catch (error) {
      if (isBusy(error) && !turn.stopRequested) {
        if (await waitToSendAgain(turn, error)) continue;
      }
      // No answer at all (the network failed): the API may have taken the job, which nobody would read now (a Stop
      // pressed meanwhile too: that job ran on, for nobody).
      if (!error.status) cancelLostSubmission(key);
      if (turn.stopRequested) {
        finish(turn, null, { status: "cancelled", error: "cancelled by the client", error_code: 5 });
        return null;
      }
      if (error.status === 401) askForKey();
      finish(turn, null, { status: "failed", error: error.message, error_code: error.code });
      return null;
    }
  }
}

/** The Idempotency-Keys of submissions sent and not answered yet: their jobs may exist, with ids the page does not
 * know. Cancelled by key when the page goes. */
const unansweredSubmissions = new Set();

/** The Idempotency-Keys of submissions whose answer was lost on the network (or given up by a Stop) and whose cancel
 * has not been taken, each with its retry `{attempt, timer}` (timer null while a cancel is on its way). */
const lostSubmissions = new Map();

// A lost submission's cancel that did not reach the API is sent again after CANCEL_RETRY_SECONDS, twice as long after
// each failure, up to this long; at once when the browser is back online; and as the page goes. Sent only as the
// page went, the job of a Stop whose cancel met a network blip ran on for nobody as long as the tab stayed open.
const LOST_CANCEL_MAX_WAIT_SECONDS = 60;

/** Cancel by its key the job a submission whose answer was lost may have made (the answer shows failed). */
function cancelLostSubmission(key) {
  const retry = lostSubmissions.get(key) ?? { attempt: 0, timer: null };
  clearTimeout(retry.timer);
  retry.timer = null;
  lostSubmissions.set(key, retry);
  cancelSubmission(key).then(() => lostSubmissions.delete(key), (error) => {
    if (!cancelWaits(error)) {
      lostSubmissions.delete(key); // answered (an ended job: 409): nothing left to cancel
      return;
    }
    const wait = error.retryAfter || Math.min(CANCEL_RETRY_SECONDS * 2 ** retry.attempt, LOST_CANCEL_MAX_WAIT_SECONDS);
    retry.attempt += 1;
    retry.timer = setTimeout(cancelLostSubmission, wait * 1000, key);
  });
}

window.addEventListener("online", () => {
  for (const [key, retry] of lostSubmissions) {
    if (retry.timer !== null) cancelLostSubmission(key);
  }
});

/** submitJob, its key in unansweredSubmissions until the answer comes (or `signal` gives it up). */
async function submitUnanswered(request, key, signal) {
  unansweredSubmissions.add(key);
  try {
    return await submitJob(request, key, { signal });
  } finally {
    unansweredSubmissions.delete(key);
  }
}

/** Wait `seconds`, calling `show(left)` each second from `seconds` down to 1. Returns `{done, stop()}`: `done`
 * resolves true once the time has passed, false when `stop()` ended the wait first. */
function countDown(seconds, show) {
  let timer = null;
  let resolveWait;
  const done = new Promise((resolve) => { resolveWait = resolve; });
  const tick = (left) => {
    if (left <= 0) {
      resolveWait(true);
      return;
    }
    show(left);
    timer = setTimeout(tick, 1000, left - 1);
  };
  tick(seconds);
  return { done, stop() { clearTimeout(timer); resolveWait(false); } };
}

/** What a refusal that says when to come back shows while it is waited out. */
const busyText = (error) => `the server is busy (${error.message}; error_code: ${error.code})`;

/** Count the refusal's Retry-After down on the answer; resolves true when it is time to send again, false on Stop. */
async function waitToSendAgain(turn, error) {
  turn.status = "waiting";
  const wait = countDown(error.retryAfter, (left) => {
    turn.meta = `${busyText(error)}; sending it again in ${left} s…`;
    updateAssistant(turn);
  });
  turn.wakeUp = wait.stop;
  const due = await wait.done;
  turn.wakeUp = null;
  if (due) {
    turn.status = "submitting";
    turn.meta = "sending…";
    updateAssistant(turn);
  }
  return due;
}

/** The answer's end: its final text from the job record, and its timings or its error. */
function finish(turn, job, ending) {
  turn.status = job ? job.status : ending.status;
  // The socket's own end for a job it could not find ("unknown"), or a refusal: a failure as far as the user goes.
  if (!FINAL_STATES.includes(turn.status)) turn.status = "failed";
  if (job) turn.text = job.text;
  if (job && job.started_at) turn.started = true; // (its socket may have said nothing of it)
  if (turn.status === "succeeded") {
    turn.error = ""; // an error chunk shown on the way is no error of an answer that succeeded
  } else {
    turn.error = (job && job.error) || ending.error || "the job did not finish";
    turn.errorCode = job ? job.error_code : ending.error_code;
  }
  turn.meta = job ? timings(job) : "";
  if (state.current === turn) {
    state.current = null;
    state.follower = null;
    ui.conversation.setAttribute("aria-busy", "false"); // before the final text goes in: that is what is read out
    if ([BUSY_NOTICE, SEND_ONCE_STOPPED_NOTICE].includes(ui.notice.textContent)) notice(""); // it can be sent now
    showImageWarnings(); // the next message goes to the model chosen now
  }
  updateAssistant(turn);
  updateButtons();
  if (state.sendOnceStopped && !state.current) {
    state.sendOnceStopped = false;
    send();
  }
}

/** "first token after 0.42 s · 37 tokens · 17.1 tokens/s" (waiting in the queue counts). */
function timings(job) {
  const tokens = job.usage.completion_tokens;
  if (!tokens) return "";
  const parts = [];
  if (job.first_token_at) parts.push(`first token after ${(job.first_token_at - job.created_at).toFixed(2)} s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  const decoding = job.finished_at && job.first_token_at ? job.finished_at - job.first_token_at : 0;
  // The first token comes with the prefill; the rate is that of the tokens after it.
  if (tokens > 1 && decoding > 0) parts.push(`${((tokens - 1) / decoding).toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

async function stopCurrent() {
  const turn = state.current;
  if (!turn) return;
  // Shown at once ("stopping…", Stop disabled), though the job's id may not have come yet: its submission still
  // unanswered, the answer kept saying "sending…" and Stop seemed not to be heard.
  turn.stopRequested = true;
  updateAssistant(turn);
  updateButtons(); // (the focus goes to the message box, not to the page's start, as Stop disables)
  if (!turn.jobId) {
    turn.wakeUp?.(); // cancelled as soon as the job exists; not sent again if it was refused
    // Given up unanswered, the submission fails as one whose answer was lost: its job is cancelled by its key, and
    // the answer ends cancelled (submitWhenTaken). (Aborting a submission that was answered meanwhile does nothing.)
    setTimeout(() => turn.submission.abort(), STOP_WAITS_FOR_SUBMISSION_MS);
    return;
  }
  try {
    await cancelJob(turn.jobId);
  } catch (error) {
    if (cancelWaits(error)) {
      // The answer stops here at once; the job is told to stop once the server takes the request (or can be
      // reached: with the API away, Stop failed and every other button waited for it to come back).
      if (state.current !== turn) return; // it ended meanwhile
      state.follower.close();
      finish(turn, null, { status: "cancelled", error: "cancelled by the client", error_code: 5 });
      cancelWhenTaken(turn, error);
      return;
    }
    // 409: it ended meanwhile; its last message says how (a 401 or 422 has error_code 4 too: not the status).
    if (error.status !== 409) {
      noticeMarkdown(`Could not stop the job: ${error.message} (error_code: ${error.code})`);
      if (state.current === turn) {
        turn.stopRequested = false; // it goes on: Stop can be tried again, and a message waiting for it stays
        state.sendOnceStopped = false;
        updateAssistant(turn);
        updateButtons();
      }
    }
  }
}

/** Jobs whose cancel the API refused as busy, or that could not reach it, and that wait to send it again: sent at
 * once when the page goes. */
const pendingCancels = new Set();

// A cancel that did not reach the API (status 0: the network, the API restarting) is sent again after this long.
const CANCEL_RETRY_SECONDS = 3;
const cancelWaits = (error) => isBusy(error) || error.status === 0;
const cancelWaitText = (error) => (error.status === 0 ? `the server cannot be reached (${error.message})`
  : busyText(error));

/** Send the cancel of `turn`'s job again after each busy refusal's Retry-After (or CANCEL_RETRY_SECONDS after a
 * failure to reach the server), counted down on the answer. */
async function cancelWhenTaken(turn, refusal) {
  pendingCancels.add(turn.jobId);
  try {
    await sendCancelWhenTaken(turn, refusal);
  } finally {
    pendingCancels.delete(turn.jobId);
  }
}

async function sendCancelWhenTaken(turn, refusal) {
  for (;;) {
    await countDown(refusal.retryAfter || CANCEL_RETRY_SECONDS, (left) => {
      turn.meta = `stopping the job: ${cancelWaitText(refusal)}; asking again in ${left} s…`;
      updateAssistant(turn);
    }).done;
    turn.meta = "";
    updateAssistant(turn);
    try {
      await cancelJob(turn.jobId);
      return;
    } catch (error) {
      if (error.status === 409) return; // it ended meanwhile
      if (!cancelWaits(error)) {
        turn.meta = `could not stop the job: ${error.message} (error_code: ${error.code})`;
        updateAssistant(turn);
        return;
      }
      refusal = error;
    }
  }
}

function regenerate() {
  if (state.current || !lastAnswer()) return;
  state.turns.pop();
  const question = state.turns.at(-1);
  if (question.image) question.image.mode = processMode(); // as the original: the current process mode
  notice("");
  generate();
}

function clearConversation() {
  if (state.current) return;
  state.turns = [];
  ui.prompt.value = "";
  setPendingImage(null);
  notice("");
  renderConversation();
  updateButtons();
}

async function vote(type) {
  const answer = lastAnswer();
  if (!answer || !answer.jobId) return;
  answer.voted = true;
  updateButtons();
  for (;;) {
    try {
      await sendFeedback(type, answer.jobId);
      notice(type === "flag" ? "Thank you: the answer is flagged." : `Thank you: your ${type} is recorded.`);
      return;
    } catch (error) {
      if (isBusy(error)) {
        // Sent again by itself, as a submission is; the buttons stay disabled meanwhile.
        const show = (left) => notice(`${busyText(error)}; the ${type} is sent again in ${left} s…`);
        await countDown(error.retryAfter, show).done;
        continue;
      }
      if (error.status === 401) askForKey();
      answer.voted = false;
      updateButtons();
      noticeMarkdown(`Could not record the ${type}: ${error.message} (error_code: ${error.code})`);
      return;
    }
  }
}

// ---- the image ---------------------------------------------------------------------------------

// Numbers each image picked: a reading still under way when another image is picked, or the image is removed, sent
// or cleared, attaches nothing when it ends (a large image's reading ended after a small one picked after it, and the
// large one was attached, then sent with the next message).
let imagePick = 0;

async function setPendingImage(image) {
  if (!image) imagePick += 1;
  showImageError(""); // (a refusal of an earlier pick)
  state.pendingImage = image;
  ui.preview.hidden = !image;
  ui.attachment.hidden = !image;
  showImageWarnings();
  if (!image) {
    ui.preview.removeAttribute("src");
    ui.attachmentThumb.removeAttribute("src");
    return;
  }
  ui.attachmentName.textContent = ui.attachmentName.title = image.name;
  await showPreview();
}

/** Whether the model named `model` has its images read: as GET /v1/models says (shared/protocol.py's rule); a model
 * the list does not name (an older API's list says nothing of it) is taken to read them, as the page always did. */
function readsImages(model) {
  return state.models.get(model)?.reads_images !== false;
}

/** The attached image says, beside its name, when the chosen model will not see it (its worker ignores images), and
 * so does every image of the conversation, under it: each goes again with every message, to the model chosen now,
 * and an answer would otherwise pass for one about it. A note kept from the model an image was first sent to said
 * the wrong model's way once another was chosen. While an answer is generated, the note is that of the model
 * generating it: another one chosen meanwhile gets the next message, and the note said the answer streaming under
 * it saw the image when it did not (or the other way round). */
function showImageWarnings() {
  const chosen = ui.model.value;
  const unread = (model) => Boolean(model) && !readsImages(model);
  setText(ui.attachmentWarning, state.pendingImage && unread(chosen)
    ? `${chosen} does not read images: choose a model that does (a LLaVA one) to ask about this image` : "");
  const answering = state.current ? state.current.model : chosen;
  for (const turn of state.turns) {
    if (!turn.image || !turn.image.sent || !turn.el) continue;
    setText(turn.el.querySelector(".image-note"), unread(answering)
      ? `${answering} does not read images: it answers the text alone, without seeing this image.` : "");
  }
}

async function showPreview() {
  if (!state.pendingImage) return;
  const { dataUrl, width, height } = await processImage(state.pendingImage.source, processMode());
  ui.preview.src = dataUrl;
  ui.attachmentThumb.src = dataUrl;
  ui.preview.title = `${width}×${height}, as it will be sent`;
}

/** Say why the image picked last was not taken ("": it was, or it was removed), and bring it into view (the image
 * may have come from a drop or a paste far from it). */
function showImageError(text) {
  ui.imageError.textContent = text;
  ui.imageError.hidden = !text;
  if (text) ui.imageError.scrollIntoView({ block: "nearest" });
}

// Where the image's error goes: in the image panel beside the chat, or, on a phone-sized screen (style.css's one
// column), over the message box where the image would have been attached. In the panel there, it was far below the
// message box and its image button, out of view, and nothing seemed to happen.
const oneColumn = matchMedia("(max-width: 760px)");
function placeImageError() {
  if (oneColumn.matches) ui.attachment.after(ui.imageError);
  else ui.preview.after(ui.imageError);
}
oneColumn.addEventListener("change", placeImageError);
placeImageError();

async function takeImageFile(file) {
  if (!file) return;
  const pick = ++imagePick;
  showImageError(""); // (shown again if this one is refused too: a screen reader says it again)
  const reading = (async () => {
    try {
      const { max_image_pixels: maxPixels } = await pageConfig;
      const source = await readImage(file, maxPixels);
      if (pick !== imagePick) return;
      await setPendingImage({ source, name: file.name || "pasted image" });
      notice("");
    } catch (error) {
      if (pick === imagePick) showImageError(error.message);
    }
  })();
  state.imageReading = reading;
  await reading;
  if (state.imageReading === reading) state.imageReading = null;
}

// Numbers each example picked: an example whose image is still downloading when another is picked is not used.
let examplePick = 0;

/** Use the example `button` holds: its text in the message box and its image attached, as the original's examples
 * set both; a text-only example removes an image attached (its question went with that image, and an image already
 * in the conversation started a new one). An image that cannot be downloaded leaves everything as it was, and the
 * notice says why. */
async function useExample(button) {
  const pick = ++examplePick;
  const { text, image } = button.dataset;
  let file = null;
  if (image) {
    const name = image.split("/").pop();
    try {
      const response = await fetch(image);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const blob = await response.blob();
      file = new File([blob], name, { type: blob.type });
    } catch (error) {
      if (pick === examplePick) {
        notice(`Could not download the example's image (${name}: ${error.message}): the example is not used.`);
      }
      return;
    }
  }
  if (pick !== examplePick) return;
  ui.prompt.value = text;
  ui.prompt.focus();
  if (file) await takeImageFile(file);
  else setPendingImage(null);
}

// ---- the model list ---------------------------------------------------------------------------

// The one timer that reads the list again, and the latest reading: a key entered reads it at once, and an earlier
// reading (or its timer) would otherwise go on beside it, each with its own loop.
let modelTimer = null;
let modelReading = 0;
let modelsAskedAt = 0; // (Date.now()) when the list was last asked for
// The notice that the model list put up (an error reading it, a key asked for): taken down once it is read.
let modelNotice = "";

function showModelNotice(text) {
  noticeMarkdown(text);
  modelNotice = ui.notice.textContent; // (as shown: the markdown's marks are not)
}

// The model chosen (by the user, or by default) that stopped being served and was replaced in the field: chosen again
// once it is served again (a worker restarting, a rolling deploy), unless the user chooses another meanwhile. Kept
// replaced, the user's next messages went for good to a model they had not chosen.
let replacedModel = null;
// The notice that the field's model changed by itself: replaced by the next one, not left saying a model that is
// back is no longer served.
let modelChangeNotice = "";

function showModelChange(text) {
  modelChangeNotice = text;
  notice(text);
}

async function loadModels() {
  clearTimeout(modelTimer);
  const reading = ++modelReading;
  modelsAskedAt = Date.now();
  let models;
  try {
    models = await listModels();
  } catch (error) {
    if (reading !== modelReading) return; // a later reading answers
    if (error.status === 401) {
      askForKey();
      state.models = new Map();
      ui.model.replaceChildren(new Option("enter the API key first", ""));
      ui.model.disabled = true;
      updateButtons();
      return; // the list is read again once a key is entered
    }
    // A list already shown stays as it is: a reading that failed says nothing of the models.
    if (!state.models.size) {
      showModelNotice(`Could not read the model list: ${error.message}`);
      // The field says why it offers no model: the list was not read (it said no model was served).
      showModels([], error.status ? "the model list cannot be read" : "the server cannot be reached");
    }
    // A 429: not before it says.
    modelTimer = setTimeout(loadModels, Math.max(MODEL_RETRY_MS, (error.retryAfter || 0) * 1000));
    return;
  }
  if (reading !== modelReading) return;
  if (ui.notice.textContent === modelNotice) notice("");
  showModels(models);
  modelTimer = setTimeout(loadModels, models.length ? MODEL_REFRESH_MS : MODEL_RETRY_MS);
}

/** Show `models` (GET /v1/models' list) in the model field, the one chosen kept while it is served. One no longer
 * served is replaced by the first (or ?model=) and the notice says so, and chosen again once it is served again;
 * an answer waiting for it says so too. With none, the field says `none`. */
function showModels(models, none = "no model is served right now") {
  const names = models.map((model) => model.id);
  const previous = ui.model.value;
  state.models = new Map(models.map((model) => [model.id, model]));
  const shown = [...ui.model.options].map((option) => option.value);
  if (names.length && ui.notice.textContent.startsWith(NO_MODEL_NOTICE)) notice(""); // it can be sent now
  // Replaced only when it changed: the field's options, replaced every refresh, closed its open list under the user.
  if (JSON.stringify(shown) !== JSON.stringify(names)) {
    if (!names.length) {
      ui.model.replaceChildren(new Option(none, ""));
      ui.model.disabled = true;
    } else {
      // As the original: the first model by default; ?model= picks one that is served.
      const wanted = new URLSearchParams(location.search).get("model");
      ui.model.replaceChildren(...names.map((name) => new Option(name, name)));
      ui.model.value = names.includes(previous) ? previous : names.includes(wanted) ? wanted : names[0];
      ui.model.disabled = false;
    }
  }
  if (replacedModel && names.includes(replacedModel)) {
    ui.model.value = replacedModel;
    // (said where the notice line said it was gone, or says nothing: not over a notice of something else)
    const said = ui.notice.textContent;
    if (!said || said === modelChangeNotice) showModelChange(`${replacedModel} is served again: it is chosen again.`);
    replacedModel = null;
  } else if (previous && !names.includes(previous)) {
    replacedModel ??= previous; // the one chosen, not a replacement that went too
    showModelChange(names.length ? `${previous} is no longer served: ${ui.model.value} is chosen now.`
      : `${previous} is no longer served, and no other model is right now.`);
  } else if (replacedModel && !previous && names.length) {
    // No model was served: one is now, not the one chosen.
    showModelChange(`${replacedModel} is no longer served: ${ui.model.value} is chosen now.`);
  }
  const turn = state.current;
  if (turn && turn.model && Boolean(turn.modelGone) === state.models.has(turn.model)) {
    turn.modelGone = !state.models.has(turn.model);
    if (turn.status === "queued") turn.meta = waitingText(turn);
    updateAssistant(turn);
  }
  showImageWarnings();
  updateButtons();
}

/** This server requires API keys: show the key field (its value is used once entered). */
function askForKey() {
  ui.keyField.hidden = false;
  showModelNotice("This server requires an API key: enter it at the top of the page.");
  ui.apiKey.focus();
}

// ---- wiring ------------------------------------------------------------------------------------

function showSliderValue(input) {
  document.querySelector(`output[for="${input.id}"]`).textContent = input.value;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
// An image pasted anywhere on the page is attached, as the image panel says ("or paste one"): only the message box
// took one, and a paste after a click on the panel, or anywhere else, did nothing. Pasted text goes in as usual, and
// a paste into another field (the API key, a parameter) is that field's alone: Word, Excel and OneNote put a picture
// of what was copied beside its text, and such a paste attached the picture and dropped the text.
document.addEventListener("paste", (event) => {
  // (:read-write: an input that takes text, a textarea, anything contenteditable; not a checkbox, slider or select.)
  if (event.target !== ui.prompt && event.target instanceof Element && event.target.matches(":read-write")) return;
  const file = [...event.clipboardData.files].find((item) => item.type.startsWith("image/"));
  if (file) {
    event.preventDefault();
    takeImageFile(file);
  }
});
ui.stop.addEventListener("click", stopCurrent);
// Escape stops the answer from anywhere on the page: from the message box, Stop took the mouse or several Tabs. (An
// open list, a file dialog or an IME's composition takes its Escape itself.)
document.addEventListener("keydown", (event) => {
  // (A held key's repeats would stop the message sent once this answer has stopped, too.)
  if (event.key !== "Escape" || event.repeat || event.isComposing || event.defaultPrevented || ui.stop.disabled) return;
  event.preventDefault();
  stopCurrent();
});
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clearConversation);
ui.upvote.addEventListener("click", () => vote("upvote"));
ui.downvote.addEventListener("click", () => vote("downvote"));
ui.flag.addEventListener("click", () => vote("flag"));
ui.image.addEventListener("change", () => {
  takeImageFile(ui.image.files[0]);
  // Emptied at once, taken or refused: the same file picked again (made smaller, as a refusal asks) fired no change,
  // and nothing happened.
  ui.image.value = "";
});
ui.removeImage.addEventListener("click", () => setPendingImage(null));
ui.attach.addEventListener("click", () => ui.image.click());
ui.dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  ui.dropzone.classList.add("dragging");
});
ui.dropzone.addEventListener("dragleave", () => ui.dropzone.classList.remove("dragging"));
// A file dropped anywhere on the page is taken as the drop zone takes it: left to the browser, it would open the file
// in place of the page, and the conversation would be gone. Text dragged into the message box goes in as usual.
const carriesFiles = (event) => Boolean(event.dataTransfer) && [...event.dataTransfer.types].includes("Files");
window.addEventListener("dragover", (event) => {
  if (carriesFiles(event)) event.preventDefault();
});
window.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  ui.dropzone.classList.remove("dragging");
  takeImageFile(event.dataTransfer.files[0]);
});
for (const radio of document.querySelectorAll('input[name="process-mode"]')) {
  radio.addEventListener("change", showPreview);
}
for (const button of ui.examples) button.addEventListener("click", () => useExample(button));
for (const slider of [ui.temperature, ui.topP, ui.maxTokens]) {
  slider.addEventListener("input", () => showSliderValue(slider));
  showSliderValue(slider);
}
ui.model.addEventListener("change", () => {
  replacedModel = null; // the user's own choice: a model that comes back does not take its place
  showImageWarnings();
  updateButtons();
});
ui.apiKey.addEventListener("change", () => {
  setApiKey(ui.apiKey.value);
  loadModels();
});

// Nobody will read an answer whose page is gone: free its slot, that of every job whose Stop waits out a busy
// refusal (its countdown dies with the page), and that of a job whose submission is still unanswered (named by its
// Idempotency-Key: the API may not even have it yet, and then makes none).
window.addEventListener("pagehide", () => {
  const jobs = new Set(pendingCancels);
  if (state.current && state.current.jobId) jobs.add(state.current.jobId);
  for (const id of jobs) cancelJob(id, { keepalive: true }).catch(() => {});
  for (const key of new Set([...unansweredSubmissions, ...lostSubmissions.keys()])) {
    cancelSubmission(key, { keepalive: true }).catch(() => {});
  }
});
loadModels();
