"""The chat page as a user reads and copies an answer while it streams, and sees an error the stream took back.

Debian's Chromium (Playwright) against the real stack and the real default model, as tests/test_page.py drives them.
"""

import time

import requests
from test_page import ANSWER_TIMEOUT_MS, ask, browser, job_record, last_answer, page, quick_answers, wait_for_end

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

# Select characters `start` to `end` of the first text of `selector`'s element, as a user's drag would.
SELECT_TEXT = """([selector, start, end]) => {
  const text = document.createTreeWalker(document.querySelector(selector), NodeFilter.SHOW_TEXT).nextNode();
  const range = document.createRange();
  range.setStart(text, start);
  range.setEnd(text, end);
  getSelection().removeAllRanges();
  getSelection().addRange(range);
}"""

# Select the whole of `selector`'s element.
SELECT_ALL_OF = """(selector) => {
  const range = document.createRange();
  range.selectNodeContents(document.querySelector(selector));
  getSelection().removeAllRanges();
  getSelection().addRange(range);
}"""

STREAMING = "#conversation > .turn.assistant:last-child .markdown"
EARLIER = "#conversation > .turn.assistant .markdown"  # querySelector: the first


def streamed_length(page) -> int:
    return page.evaluate(f"document.querySelector({STREAMING!r}).textContent.length")


def test_text_selected_while_an_answer_streams_stays_selected_and_copies_without_the_cursor(page, stack):
    # Every chunk wrote the streaming answer anew (innerHTML): what a user had selected in it to copy was gone at the
    # next token. The cursor went with a selection that reached the answer's end ("…there was▌" on the clipboard).
    quick_answers(page)
    ask(page, "What is the capital of France?")
    assert wait_for_end(page) == "succeeded"
    page.get_by_label("Max output tokens").fill("128")
    ask(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function(f"document.querySelector({STREAMING!r}).textContent.length > 30", timeout=ANSWER_TIMEOUT_MS)

    page.evaluate(SELECT_ALL_OF, STREAMING)
    copied = page.evaluate("getSelection().toString()")
    assert last_answer(page).get_attribute("data-status") == "running", "the answer ended before it was selected"
    assert copied and "▌" not in copied, copied

    page.evaluate(SELECT_TEXT, [STREAMING, 0, 12])
    selected = page.evaluate("getSelection().toString()")
    assert len(selected) == 12, selected
    grown = streamed_length(page) + 40
    page.wait_for_function(f"document.querySelector({STREAMING!r}).textContent.length > {grown}"
                           " || document.querySelector('#conversation > .turn.assistant:last-child').dataset.status"
                           " !== 'running'", timeout=ANSWER_TIMEOUT_MS)
    assert streamed_length(page) > grown, "the answer ended before it grew: nothing streamed past the selection"
    assert page.evaluate("getSelection().toString()") == selected
    assert wait_for_end(page) == "succeeded"
    assert page.evaluate("getSelection().toString()") == selected  # the answer's last rendering kept it too
    # Patched chunk by chunk, the answer ends as the whole text rendered at once would show it.
    text = job_record(stack.base_url, last_answer(page).get_attribute("data-job-id"))["text"].strip()
    rendered_at_once = page.evaluate("""async (text) => {
      const { renderMarkdown } = await import("./static/markdown.js");
      return renderMarkdown(text);
    }""", text)
    assert last_answer(page).locator(".markdown").inner_html() == rendered_at_once

    # Part of an earlier answer, selected while a new one streams, stays selected as well.
    page.get_by_label("Max output tokens").fill("64")
    ask(page, "Write a story about a dragon.")
    page.wait_for_function(f"document.querySelector({STREAMING!r}).textContent.length > 10", timeout=ANSWER_TIMEOUT_MS)
    page.evaluate(SELECT_TEXT, [EARLIER, 4, 11])
    selected = page.evaluate("getSelection().toString()")
    assert len(selected) == 7, selected
    assert wait_for_end(page) == "succeeded"
    assert page.evaluate("getSelection().toString()") == selected


# The page's first POST /v1/jobs: the API answers it, and the page is given that answer only when the test says, as
# made (`answerHeldSubmission`) or lost on the network (`loseHeldAnswer`); the job's id meanwhile in window.heldJobs.
HOLD_SUBMISSION_ANSWER = """() => {
  window.heldJobs = [];
  let settle = null;
  window.answerHeldSubmission = () => settle(true);
  window.loseHeldAnswer = () => settle(false);
  const fetchAnswered = window.fetch.bind(window);
  window.fetch = (url, options = {}) => {
    const response = fetchAnswered(url, options);
    if (settle || options.method !== "POST" || !/\\/v1\\/jobs$/.test(String(url))) return response;
    response.then((answer) => answer.clone().json()).then((job) => window.heldJobs.push(job.id));
    return new Promise((resolve, reject) => {
      settle = (answered) => answered ? resolve(response) : reject(new TypeError("Failed to fetch"));
    });
  };
}"""


def test_stop_while_the_submission_is_unanswered_cancels_the_job_whose_answer_is_lost(page, stack):
    # Stop pressed before the submission's answer came, and that answer lost on the network: the answer showed
    # cancelled, but the job the API had made (the page never learnt its id) was not cancelled by its
    # Idempotency-Key, as it is without a Stop, and generated its whole answer for nobody.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("1024")
    page.evaluate(HOLD_SUBMISSION_ANSWER)
    ask(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function("window.heldJobs.length > 0", timeout=15_000)
    job_id = page.evaluate("window.heldJobs[0]")
    assert last_answer(page).get_attribute("data-status") == "submitting"
    page.get_by_role("button", name="Stop").click()
    page.evaluate("window.loseHeldAnswer()")
    assert wait_for_end(page, 5_000) == "cancelled"
    deadline = time.monotonic() + 15
    try:
        while (status := job_record(stack.base_url, job_id)["status"]) in ("queued", "running"):
            assert time.monotonic() < deadline, f"the job is still {status}: it goes on for an answer shown cancelled"
            time.sleep(0.2)
    finally:
        requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)  # a job left running slows the next tests
    assert status == "cancelled", status
