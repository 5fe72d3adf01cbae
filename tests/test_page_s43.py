"""The chat page as a user meets a Stop that cannot reach the server, an error that names code, and a model chosen
while an answer about an image streams.

Debian's Chromium (Playwright) against the real stack (the default model, text only) and a real tiny LLaVA worker
beside it, as tests/test_page.py drives them; a network failure is Playwright's abort of one request, as there.
"""

import json

from playwright.sync_api import expect
from test_page import ANSWER_TIMEOUT_MS, abort_the_first, ask, browser, last_answer, page, wait_for_end
from test_page2_s42 import SERVER_ERROR_MSG
from test_page_s42 import LLAVA, asked_about_an_image

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

LONG_STORY = "Write a long story about a lighthouse keeper."


def test_a_stop_that_cannot_reach_the_server_shows_the_network_error_as_markdown(page, stack):
    # The answer's status line said "stopping the job: the server cannot be reached (**NETWORK ERROR ...** (Failed to
    # fetch)); asking again in 3 s…", asterisks and all, where the answer's error box shows the same message bold.
    abort_the_first(page, "DELETE", r"/v1/jobs/[^/]+$")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("1024")
    ask(page, LONG_STORY)
    page.wait_for_function("window.seen.some(state => state.status === 'running' && state.text.length > 3)",
                           timeout=ANSWER_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").click()
    assert wait_for_end(page, 5_000) == "cancelled"
    meta = last_answer(page).locator(".meta")
    expect(meta).to_contain_text("stopping the job: the server cannot be reached")
    expect(meta.locator("strong")).to_have_text(SERVER_ERROR_MSG)
    assert "*" not in meta.inner_text()


def test_code_in_an_error_is_shaded_as_in_the_chat(page, stack):
    # An error box rendered its markdown, but its inline code looked like the text around it: the chat's code style
    # was for answers and messages alone.
    message = "`max_new_tokens` must be at most 1024"
    page.route("**/v1/jobs", lambda route: route.fulfill(status=422, content_type="application/json", body=json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": "max_new_tokens", "code": 4}})),
        times=1)
    ask(page, "What does `print` do?")
    assert wait_for_end(page) == "failed"
    in_error = last_answer(page).locator(".error code")
    expect(in_error).to_have_text("max_new_tokens")
    looks = "element => { const style = getComputedStyle(element); " \
            "return [style.backgroundColor, style.fontFamily, style.padding, style.borderRadius]; }"
    in_message = page.locator(".turn.user code")
    expect(in_message).to_have_text("print")
    assert in_error.evaluate(looks) == in_message.evaluate(looks)


def test_the_note_under_an_image_is_the_answering_models_while_its_answer_streams(browser, stack, tiny_llava_dir):
    # The note under the conversation's image followed the model field at once: chosen while a text-only model's
    # answer streamed, a LLaVA model took the note away, and the answer streaming under it passed for one that saw
    # the image. The field's model is the next message's: the note follows it once the answer has ended.
    with asked_about_an_image(browser, stack, tiny_llava_dir) as (page, text_only):
        note = page.locator(".turn.user .image-note")
        not_seen = f"{text_only} does not read images: it answers the text alone, without seeing this image."
        page.get_by_label("Model").select_option(text_only)
        page.get_by_label("Max output tokens").fill("1024")
        ask(page, LONG_STORY)
        page.wait_for_function("window.seen.some(state => state.status === 'running' && state.text.length > 3)",
                               timeout=ANSWER_TIMEOUT_MS)
        page.get_by_label("Model").select_option(LLAVA)
        expect(note).to_have_text(not_seen, timeout=2_000)
        assert last_answer(page).get_attribute("data-status") == "running"  # (the note was read as it streamed)

        page.get_by_role("button", name="Stop").click()
        assert wait_for_end(page) == "cancelled"
        expect(note).to_have_text("")
