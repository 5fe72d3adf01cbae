"""The chat page as a user meets a network error, the examples (with an image attached, while an answer streams, and
when an example's image cannot be downloaded), Enter with no model served, and a code block fenced with four
backticks.

Debian's Chromium (Playwright) against the real stack and the real default model (SmolLM2, text only), as
tests/test_page.py drives them; a network failure is Playwright's abort of one request, as there.
"""

import json

from conftest import run_stack
from playwright.sync_api import expect
from test_markdown_s40 import render
from test_page import ANSWER_TIMEOUT_MS, NO_CSP, abort_the_first, ask, browser, last_answer, page, quick_answers, \
    wait_for_end
from test_page2_s41 import SHAPES

from shared.redis_server import RedisServer

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

SERVER_ERROR_MSG = "NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE."
HAIKU = "Write a haiku about a queue of people waiting for a bus."


def test_an_error_shows_its_markdown_as_the_original_does_and_never_its_html(page, stack):
    # The network error is the original's server_error_msg, markdown: the page showed its asterisks
    # ("**NETWORK ERROR ...** (Failed to fetch)") where the original's chat shows it bold.
    quick_answers(page)
    abort_the_first(page, "POST", r"/v1/jobs$")
    ask(page, "What is the capital of France?")
    assert wait_for_end(page) == "failed"
    error = last_answer(page).locator(".error")
    expect(error.locator("strong")).to_have_text(SERVER_ERROR_MSG)
    assert error.inner_text() == f"{SERVER_ERROR_MSG} (Failed to fetch) (error_code: 1)"

    # HTML in an error's message is shown as text, as in an answer.
    unsafe = '<img src=x onerror="window.ran = 1"> **held back**'
    page.route("**/v1/jobs", lambda route: route.fulfill(status=500, content_type="application/json", body=json.dumps(
        {"error": {"message": unsafe, "type": "server_error", "param": None, "code": 1}})), times=1)
    ask(page, "What is the capital of Italy?")
    assert wait_for_end(page) == "failed"
    expect(error.locator("strong")).to_have_text("held back")
    assert error.inner_text() == '<img src=x onerror="window.ran = 1"> held back (error_code: 1)'
    assert error.locator("img").count() == 0 and page.evaluate("window.ran") is None

    # A notice that carries the network error shows it the same way.
    ask(page, "What is the capital of Spain?")
    assert wait_for_end(page) == "succeeded"
    abort_the_first(page, "POST", r"/v1/feedback$")
    page.get_by_role("button", name="Upvote").click()
    notice = page.locator("#notice")
    expect(notice.locator("strong")).to_have_text(SERVER_ERROR_MSG)
    expect(notice).to_have_text(f"Could not record the upvote: {SERVER_ERROR_MSG} (Failed to fetch) (error_code: 1)")


def test_a_text_only_example_removes_the_image_attached(page, stack):
    # The haiku example kept the image attached: the question went with it, and with an image already in the
    # conversation, it started a new conversation.
    quick_answers(page)
    page.get_by_label("Choose an image").set_input_files(SHAPES)
    ask(page, "What shapes are in this picture?")
    assert wait_for_end(page) == "succeeded"
    page.get_by_label("Choose an image").set_input_files(SHAPES)
    expect(page.locator("#attachment")).to_be_visible()
    page.get_by_role("button", name=HAIKU).click()
    expect(page.locator("#attachment")).to_be_hidden()
    expect(page.get_by_label("Message")).to_have_value(HAIKU)
    page.get_by_label("Message").press("Enter")
    assert wait_for_end(page) == "succeeded"
    expect(page.locator(".turn.user")).to_have_count(2)  # the same conversation
    expect(page.locator(".turn.user").last.locator("img")).to_have_count(0)
    expect(page.locator("#notice")).to_have_text("")


def test_an_example_keeps_the_message_being_written_while_an_answer_streams_or_its_image_fails(page, stack):
    # An example's image that failed to download showed nothing (an unhandled rejection), its text in the box all the
    # same; and an example replaced the next message being written while an answer streamed.
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    message = page.get_by_label("Message")
    message.fill("My own question.")
    page.route("**/static/examples/lake-pier.png", lambda route: route.abort(), times=1)
    page.get_by_role("button", name="What are the things I should be cautious about").click()
    expect(page.locator("#notice")).to_have_text(
        "Could not download the example's image (lake-pier.png: Failed to fetch): the example is not used.")
    expect(message).to_have_value("My own question.")
    expect(page.locator("#attachment")).to_be_hidden()
    assert not errors, errors

    # While an answer streams, the examples are disabled, as the original's buttons are.
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("512")  # long enough to be still streaming; stopped below
    ask(page, "Write a long story about a dragon.")
    page.wait_for_function("document.querySelector('#conversation > .turn.assistant:last-child')"
                           ".dataset.status === 'running'", timeout=ANSWER_TIMEOUT_MS)
    message.fill("And one about a knight.")
    haiku = page.get_by_role("button", name=HAIKU)
    expect(haiku).to_be_disabled()
    assert last_answer(page).get_attribute("data-status") == "running", "the answer ended first: nothing shown"
    page.get_by_role("button", name="Stop").click()
    assert wait_for_end(page) == "cancelled"
    expect(haiku).to_be_enabled()
    expect(message).to_have_value("And one about a knight.")


def test_enter_with_no_model_served_says_why_the_message_stays(browser):
    # Enter with no model served did nothing and said nothing.
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-page-none-") as api:
        page = browser.new_page(**NO_CSP)
        try:
            page.goto(f"{api.base_url}/")
            expect(page.get_by_label("Model")).to_have_text("no model is served right now")
            message = page.get_by_label("Message")
            message.fill("Is anyone there?")
            message.press("Enter")
            expect(page.locator("#notice")).to_have_text(
                "Your message stays in the box: there is no model to send it to (no model is served right now).")
            expect(message).to_have_value("Is anyone there?")
            assert page.locator(".turn").count() == 0
        finally:
            page.close()


def test_a_fence_of_four_backticks_or_of_tildes_opens_a_code_block_only_a_fence_as_long_closes(page):
    # "````" opened no code block (a fence is 3 or more backticks or tildes): an answer that shows a fenced block
    # inside one showed its backticks, and its inner fence opened a block that took the rest.
    nested, tildes, longer, unclosed = render(
        page, "````markdown\n```python\nprint(1)\n```\n````\nAfter.", "~~~ text `x`\ncode\n```\n~~~~\nAfter.",
        "```\na\n`````\nAfter.", "````\na\n```\nb")
    assert nested == '<pre><code class="language-markdown">```python\nprint(1)\n```</code></pre><p>After.</p>', nested
    assert tildes == '<pre><code class="language-text">code\n```</code></pre><p>After.</p>', tildes
    assert longer == "<pre><code>a</code></pre><p>After.</p>", longer
    assert unclosed == "<pre><code>a\n```\nb</code></pre>", unclosed
