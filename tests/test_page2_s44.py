"""The chat page as a user meets a Stop whose submission the network never answers, an image the page refuses, and a
model list the page cannot read.

Debian's Chromium (Playwright) against the real stack (the default model, text only), as tests/test_page.py drives
them; a network that drops a request, or an API that errs, is Playwright's routing of the page's requests, as there.
"""

import re
import time

import requests
from playwright.sync_api import expect
from test_page import NO_CSP, SERVER_ERROR, ask, browser, last_answer, page, quick_answers, wait_for_end

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py


def test_stop_gives_up_a_submission_never_answered_and_cancels_its_job_by_its_key(page, stack):
    # The submission's POST went unanswered for good (a network that drops traffic silently): Stop showed "stopping…"
    # and waited for its answer with no time limit, the answer never ended, and nothing could be sent.
    held = []
    page.route(re.compile(r"/v1/jobs$"), lambda route: held.append(route))  # neither let through nor answered
    quick_answers(page)
    ask(page, "What is the capital of France?")
    expect(last_answer(page).locator(".meta")).to_have_text("sending…")
    while not held:
        page.wait_for_timeout(50)
    with page.expect_response(re.compile(r"/v1/jobs/cancel$"), timeout=10_000) as cancel:
        page.get_by_role("button", name="Stop").click()
        stopped = time.monotonic()
        assert wait_for_end(page, 10_000) == "cancelled"
    assert time.monotonic() - stopped < 8, "the answer ended, but long after Stop"
    expect(last_answer(page).locator(".error")).to_have_text("cancelled by the client (error_code: 5)")
    expect(page.get_by_role("button", name="Regenerate")).to_be_enabled()
    # The cancel names the submission's key: the submission reaching the API afterwards makes no job.
    key = held[0].request.headers["idempotency-key"]
    assert cancel.value.request.headers["idempotency-key"] == key
    assert cancel.value.status == 202, cancel.value.text()
    late = requests.post(f"{stack.base_url}/v1/jobs", json=held[0].request.post_data_json,
                         headers={"Idempotency-Key": key}, timeout=10)
    assert late.status_code == 202, late.text
    assert late.json() == {"id": cancel.value.json()["id"], "status": "cancelled"}


SVG = '<svg xmlns="http://www.w3.org/2000/svg"{size} viewBox="0 0 20 10"><rect width="20" height="10"/></svg>'


def test_an_image_refused_says_why_where_the_image_goes(page, tmp_path):
    # The refusal was a grey line under the chat's buttons, far from the image panel, and went unseen; every SVG was
    # "not an image the browser can read", one with a size of its own too.
    chooser = page.get_by_label("Choose an image")
    panel = page.get_by_role("complementary", name="Image and parameters")
    notes = tmp_path / "notes.png"
    notes.write_text("Just a text file, not an image.\n")
    chooser.set_input_files(notes)
    expect(panel.get_by_role("alert")).to_have_text("notes.png is not an image the browser can read")
    expect(page.locator("#notice")).to_have_text("")

    unsized = tmp_path / "logo.svg"
    unsized.write_text(SVG.format(size=""))
    chooser.set_input_files(unsized)
    expect(panel.get_by_role("alert")).to_have_text(re.compile(
        r"^logo\.svg is an SVG without a width and height: .* Give its <svg> element width and height attributes"))
    expect(page.locator("#attachment")).to_be_hidden()

    sized = tmp_path / "sized.svg"
    sized.write_text(SVG.format(size=' width="20" height="10"'))
    chooser.set_input_files(sized)
    expect(page.locator("#attachment-name")).to_have_text("sized.svg")
    expect(panel.get_by_role("alert")).to_have_count(0)
    expect(page.get_by_alt_text("preview of the image as it will be sent")).to_have_attribute(
        "title", "20×10, as it will be sent")


def test_a_model_list_that_cannot_be_read_says_so_and_is_read_again(browser, stack):
    # The API down or erring as the page loaded: the model field said "no model is served right now". (On a phone, a
    # field's text that long made the page wider than the screen.)
    answer = {"now": "drop"}

    def route_it(route):
        if answer["now"] == "drop":
            route.abort()
        elif answer["now"] == "err":
            route.fulfill(**SERVER_ERROR)
        else:
            route.continue_()

    page = browser.new_page(viewport={"width": 320, "height": 640}, **NO_CSP)
    try:
        page.route(re.compile(r"/v1/models$"), route_it)
        page.goto(f"{stack.base_url}/")
        model = page.get_by_label("Model")
        expect(model).to_have_text("the server cannot be reached")
        expect(model).to_be_disabled()
        answer["now"] = "err"
        expect(model).to_have_text("the model list cannot be read", timeout=10_000)
        assert page.evaluate("document.documentElement.scrollWidth") == 320
        page.get_by_label("Message").fill("Is anyone there?")
        page.get_by_label("Message").press("Enter")
        expect(page.locator("#notice")).to_have_text("Your message stays in the box: there is no model to send it to "
                                                     "(the model list cannot be read).")
        answer["now"] = "pass"
        [served] = [found["id"] for found in requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]]
        expect(model).to_have_value(served, timeout=10_000)
        expect(model).to_be_enabled()
    finally:
        page.close()
