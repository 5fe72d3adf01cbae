"""The chat page as a user sees an image its model will not read, a Stop pressed before the job exists, a message
sent while an answer streams, and a model whose worker went away.

Debian's Chromium (Playwright) against the real stack and the real default model (SmolLM2, text only), as
tests/test_page.py drives them.
"""

import asyncio
import os
import re
import time
from pathlib import Path

import requests
from conftest import model_workers
from playwright.sync_api import expect
from test_page import ANSWER_TIMEOUT_MS, ask, browser, job_record, last_answer, open_page, page, quick_answers, \
    wait_for_end
from test_page_s41 import HOLD_SUBMISSION_ANSWER

from api.routes.models import _model_objects

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

SHAPES = Path(__file__).parents[1] / "frontend/examples/shapes.png"


def served(base_url: str) -> dict[str, dict]:
    return {model["id"]: model for model in requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]}


def test_the_model_list_says_whether_each_model_reads_images(stack):
    # The page had no way to know but to repeat shared/protocol.py's rule: the list says it, by that rule.
    [model] = served(stack.base_url).values()
    assert model["reads_images"] is False, model
    assert requests.get(f"{stack.base_url}/v1/models/{model['id']}", timeout=10).json() == model
    workers = [{"model": "liuhaotian/llava-v1.5-7b", "started_at": 5}, {"model": "SmolLM2-135M-Instruct"}]
    listed = asyncio.run(_model_objects(None, workers))
    assert {found["id"]: found["reads_images"] for found in listed} == \
        {"SmolLM2-135M-Instruct": False, "liuhaotian/llava-v1.5-7b": True}


def test_an_image_for_a_model_that_reads_none_is_marked_as_not_seen(page, stack):
    # A text-only model's worker ignores images: the image sat beside the message, then in the user's bubble, as if
    # the model had seen it, and the answer passed for one about it.
    [model] = served(stack.base_url)
    quick_answers(page)
    page.get_by_label("Choose an image").set_input_files(SHAPES)
    warning = page.locator("#attachment-warning")
    expect(warning).to_have_text(f"{model} does not read images: choose a model that does (a LLaVA one) to ask "
                                 "about this image")
    expect(warning).to_be_visible()
    expect(page.get_by_label("Message")).to_have_accessible_description(re.compile(f"^{model} does not read images"))

    ask(page, "What shapes are in this picture?")
    wait_for_end(page)
    bubble = page.locator(".turn.user .bubble")
    expect(bubble.get_by_alt_text("user upload image")).to_be_visible()
    expect(bubble.locator(".image-note")).to_have_text(
        f"{model} does not read images: it answers the text alone, without seeing this image.")
    # Nothing is attached any more: nothing to warn of, and the message box is described by nothing.
    expect(page.locator("#attachment")).to_be_hidden()
    expect(page.get_by_label("Message")).to_have_accessible_description("")


# The page's next submission reaches the API, which makes its job; its answer is held back until
# window.answerHeldSubmission() lets it through (the job id goes to window.heldJobs as the API answers).
BUSY = "An answer is still being generated: your message stays in the box. Send it once the answer has ended, or " \
       "press Stop."


def test_stop_pressed_before_the_job_exists_shows_at_once(page, stack):
    # Stop pressed while the submission was unanswered changed nothing on screen ("sending…", Stop still enabled)
    # until the job id came back.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("1024")
    page.evaluate(HOLD_SUBMISSION_ANSWER)
    ask(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function("window.heldJobs.length > 0", timeout=15_000)
    job_id = page.evaluate("window.heldJobs[0]")
    try:
        expect(last_answer(page).locator(".meta")).to_have_text("sending…")
        page.get_by_role("button", name="Stop").click()
        expect(last_answer(page).locator(".meta")).to_have_text("stopping…")
        expect(page.get_by_role("button", name="Stop")).to_be_disabled()
        expect(page.get_by_label("Message")).to_be_focused()  # not dropped to the page's start
        assert last_answer(page).get_attribute("data-status") == "submitting"
        page.evaluate("window.answerHeldSubmission()")
        assert wait_for_end(page, 15_000) == "cancelled"
        assert job_record(stack.base_url, job_id)["status"] == "cancelled"
    finally:
        requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)  # a job left running slows the next tests


def test_a_message_sent_while_an_answer_streams_stays_and_the_page_says_why(page, stack):
    # Enter while an answer streamed did nothing and said nothing: the message stayed in the box, unexplained.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("512")  # long enough to be still streaming; stopped below
    ask(page, "Write a long story about a dragon.")
    page.wait_for_function("document.querySelector('#conversation > .turn.assistant:last-child')"
                           ".dataset.status === 'running'", timeout=ANSWER_TIMEOUT_MS)
    message = page.get_by_label("Message")
    message.fill("And one about a knight.")
    message.press("Enter")
    expect(page.locator("#notice")).to_have_text(BUSY)
    expect(message).to_have_value("And one about a knight.")
    send = page.get_by_role("button", name="Send")
    expect(send).to_be_disabled()
    expect(send).to_have_attribute("title", re.compile("wait for it to end, or press Stop"))
    assert page.locator(".turn.user").count() == 1
    assert last_answer(page).get_attribute("data-status") == "running", "the answer ended before Enter: nothing shown"
    page.get_by_role("button", name="Stop").click()
    assert wait_for_end(page) == "cancelled"
    # The answer has ended: the notice goes, and the message waiting in the box is sent with Enter.
    expect(page.locator("#notice")).to_have_text("")
    expect(send).to_have_attribute("title", "")
    page.get_by_label("Max output tokens").fill("1")
    message.press("Enter")
    expect(page.locator(".turn.user")).to_have_count(2)
    expect(message).to_have_value("")
    wait_for_end(page)


GONE = "page-gone-model"


def test_a_job_for_a_model_whose_worker_went_away_says_so_and_the_list_follows(browser, stack, default_model_dir):
    # The page read the model list once: a job for a model no worker serves any more waited "in the queue" for good,
    # and the model stayed chosen for every next message.
    with model_workers(stack, dict(os.environ, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir)), [GONE]):
        deadline = time.monotonic() + 120
        while GONE not in served(stack.base_url):  # (model_workers waits for one worker: the stack's own may count)
            assert time.monotonic() < deadline, "the second worker never announced itself"
            time.sleep(0.3)
        page = open_page(browser, stack.base_url, f"?model={GONE}")
    job_id = None
    try:
        assert GONE not in served(stack.base_url)  # its worker stopped, and took itself out of the registry
        expect(page.get_by_label("Model")).to_have_value(GONE)  # the page has not read the list again yet
        quick_answers(page)
        ask(page, "What is the capital of France?")
        page.wait_for_function("document.querySelector('#conversation > .turn.assistant:last-child')"
                               "?.dataset.jobId", timeout=15_000)
        job_id = last_answer(page).get_attribute("data-job-id")
        meta = last_answer(page).locator(".meta")
        expect(meta).to_have_text(f"no worker serves {GONE} now: the job waits until one comes back (Stop gives up; "
                                  "another model can be chosen at the top)", timeout=20_000)
        assert last_answer(page).get_attribute("data-status") == "queued"
        [other] = served(stack.base_url)
        expect(page.get_by_label("Model")).to_have_value(other)
        expect(page.locator("#notice")).to_have_text(f"{GONE} is no longer served: {other} is chosen now.")
        page.get_by_role("button", name="Stop").click()
        assert wait_for_end(page, 15_000) == "cancelled"
        assert job_record(stack.base_url, job_id)["model"] == GONE

        # The next question goes to the model now chosen, which is served.
        ask(page, "What is the capital of Italy?")
        assert wait_for_end(page) == "succeeded"
        assert job_record(stack.base_url, last_answer(page).get_attribute("data-job-id"))["model"] == other
    finally:
        if job_id:
            requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
        page.close()
