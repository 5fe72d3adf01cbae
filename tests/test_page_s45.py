"""The chat page as a user meets an answer that no worker made, an image refused on a phone, and a Stop whose cancel
meets a network that is down.

Debian's Chromium (Playwright) against the real stack (the default model, text only), as tests/test_page.py drives
them; a network that drops a request is Playwright's routing of the page's requests, or the browser taken offline.
"""

import re
import time

import requests
from playwright.sync_api import expect
from test_page import abort_the_first, ask, browser, job_record, last_answer, page, quick_answers, wait_for_end
from test_page2_s41 import SHAPES

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py


def test_only_an_answer_a_worker_made_says_it_was_made_without_the_image(page, stack):
    # An answer that never reached a worker (its submission failed on the network, or a Stop gave it up unanswered)
    # said "Answered without seeing the image" as soon as it was sent: no model had answered at all.
    quick_answers(page)
    model = page.get_by_label("Model").input_value()  # (the stack's model reads no images)
    page.get_by_label("Choose an image").set_input_files(SHAPES)
    ask(page, "What shapes are in this picture?")
    assert wait_for_end(page) == "succeeded"
    note = last_answer(page).locator(".answer-note")
    expect(note).to_have_text(f"Answered without seeing the image: {model} does not read images.")

    failed = abort_the_first(page, "POST", r"/v1/jobs$")
    page.get_by_role("button", name="Regenerate").click()
    assert wait_for_end(page) == "failed"
    assert failed
    expect(note).to_have_text("")

    held = []
    page.route(re.compile(r"/v1/jobs$"), lambda route: held.append(route))  # neither let through nor answered
    page.get_by_role("button", name="Regenerate").click()
    expect(last_answer(page).locator(".meta")).to_have_text("sending…")
    expect(note).to_have_text("")
    page.get_by_role("button", name="Stop").click()
    assert wait_for_end(page, 10_000) == "cancelled"
    assert held
    expect(note).to_have_text("")


def test_an_image_refused_on_a_phone_says_why_in_view(page, tmp_path):
    # On a phone the image panel is below the chat: the refusal of an image picked with "+ Image" beside Send went
    # there, out of view, and the pick seemed to do nothing.
    page.set_viewport_size({"width": 360, "height": 640})
    notes = tmp_path / "notes.png"
    notes.write_text("Just a text file, not an image.\n")
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Image", exact=True).click()
    chooser.value.set_files(notes)
    error = page.get_by_role("alert").filter(has_text="notes.png")
    expect(error).to_have_text("notes.png is not an image the browser can read")
    expect(error).to_be_in_viewport(ratio=1)
    assert page.evaluate("document.documentElement.scrollWidth") == 360
    # Side by side again, the image panel says it, where the image shows.
    page.set_viewport_size({"width": 1280, "height": 860})
    panel = page.get_by_role("complementary", name="Image and parameters")
    expect(panel.get_by_role("alert")).to_have_text("notes.png is not an image the browser can read")
    expect(panel.get_by_role("alert")).to_be_in_viewport(ratio=1)


# The submission reaches the API, which makes its job, and its answer never reaches the page (a network that drops
# traffic silently) until the page gives it up (its signal aborts).
HOLD_SUBMISSION_ANSWER_UNTIL_GIVEN_UP = """() => {
  window.heldJobs = [];
  const fetchAnswered = window.fetch.bind(window);
  window.fetch = (url, options = {}) => {
    const response = fetchAnswered(url, options);
    if (options.method !== "POST" || !/\\/v1\\/jobs$/.test(String(url))) return response;
    response.then((answer) => answer.json()).then((job) => window.heldJobs.push(job.id));
    return new Promise((resolve, reject) => options.signal.addEventListener(
      "abort", () => reject(new DOMException("the answer never came", "AbortError"))));
  };
}"""


def test_a_stop_whose_cancel_meets_a_network_that_is_down_cancels_once_it_is_back(page, stack):
    # Stop gave the unanswered submission up after 3 s and cancelled its job by its Idempotency-Key; with the network
    # down then, that cancel failed and was sent again only as the page closed: the job ran on for nobody meanwhile.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("1024")
    failed_cancels = []
    page.on("requestfailed", lambda request: failed_cancels.append(request.url)
            if request.url.endswith("/v1/jobs/cancel") else None)
    page.evaluate(HOLD_SUBMISSION_ANSWER_UNTIL_GIVEN_UP)
    ask(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function("window.heldJobs.length > 0", timeout=15_000)
    job_id = page.evaluate("window.heldJobs[0]")
    try:
        page.context.set_offline(True)
        page.get_by_role("button", name="Stop").click()
        assert wait_for_end(page, 10_000) == "cancelled"
        deadline = time.monotonic() + 10
        while len(failed_cancels) < 2:  # sent again while the page is open, the network still down
            assert time.monotonic() < deadline, f"the cancel was not sent again: {failed_cancels}"
            page.wait_for_timeout(100)
        # Back online, it goes at once, not at its next try (6 s on).
        with page.expect_response(re.compile(r"/v1/jobs/cancel$"), timeout=2_500) as cancel:
            page.context.set_offline(False)
        if cancel.value.status == 409:  # the job ended before the cancel came
            assert job_record(stack.base_url, job_id)["status"] == "succeeded"
            return
        assert cancel.value.status == 202, cancel.value.text()
        assert cancel.value.json()["id"] == job_id
        deadline = time.monotonic() + 30
        while (status := job_record(stack.base_url, job_id)["status"]) != "cancelled":
            assert status in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(0.3)
    finally:
        page.context.set_offline(False)
        requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)  # a job left running slows the next tests
