"""The chat page as a user meets it: an answer made without the conversation's image says so for good, Escape stops
an answer, and a message sent while an answer stops goes once it has.

Debian's Chromium (Playwright) against the real stack (the default model, text only) and a real tiny LLaVA worker
beside it, as tests/test_page.py drives them.
"""

from playwright.sync_api import expect
from test_page import ANSWER_TIMEOUT_MS, ask, browser, job_record, last_answer, page, quick_answers, wait_for_end
from test_page_s42 import LLAVA, asked_about_an_image
from test_page_s43 import LONG_STORY

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py


def test_an_answer_made_without_the_image_says_so_whatever_model_is_chosen_later(browser, stack, tiny_llava_dir):
    # Only the note under the image said that a text-only model answered without seeing it, and that note follows the
    # model chosen now: with a LLaVA model chosen again, nothing said the earlier text-only answer never saw the image.
    with asked_about_an_image(browser, stack, tiny_llava_dir) as (page, text_only):
        answers = page.locator(".turn.assistant")
        page.get_by_label("Model").select_option(text_only)
        ask(page, "And what colour is each?")
        assert wait_for_end(page) == "succeeded"

        page.get_by_label("Model").select_option(LLAVA)
        expect(page.locator(".turn.user .image-note")).to_have_text("")  # (the next message's: LLaVA sees it)
        expect(page.locator("#conversation")).to_contain_text(f"{text_only} does not read images")
        note = f"Answered without seeing the image: {text_only} does not read images."
        expect(answers.nth(1).locator(".answer-note")).to_have_text(note)
        expect(answers.nth(1).locator(".answer-note")).to_be_visible()
        expect(answers.nth(0).locator(".answer-note")).to_have_text("")  # LLaVA's answer saw it


def streaming_a_long_story(page) -> None:
    """Ask for a long story and wait until its answer streams."""
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max output tokens").fill("1024")
    ask(page, LONG_STORY)
    page.wait_for_function("window.seen.some(state => state.status === 'running' && state.text.length > 3)",
                           timeout=ANSWER_TIMEOUT_MS)


def test_escape_stops_the_answer_from_the_message_box(page, stack):
    # Escape did nothing: stopping an answer from the keyboard took Tab after Tab from the message box to Stop.
    streaming_a_long_story(page)
    page.get_by_label("Message").press("Escape")
    assert wait_for_end(page, 5_000) == "cancelled"
    assert job_record(stack.base_url, last_answer(page).get_attribute("data-job-id"))["status"] == "cancelled"
    expect(page.get_by_label("Message")).to_be_focused()


def test_a_message_sent_while_the_answer_stops_goes_once_it_has(page, stack):
    # Stop, then Enter on the next message at once: the answer had not ended yet (the server had still to say so), so
    # the message stayed in the box with a notice to "press Stop", and went nowhere once the answer had stopped.
    streaming_a_long_story(page)
    page.get_by_label("Message").fill("What is the capital of France?")
    quick_answers(page)  # (for the next answer)
    page.get_by_role("button", name="Stop").click()
    expect(last_answer(page).locator(".meta")).to_have_text("stopping…")
    page.get_by_label("Message").press("Enter")
    expect(page.locator(".turn.user")).to_have_count(2)
    assert wait_for_end(page) == "succeeded"
    assert page.locator(".turn.assistant").first.get_attribute("data-status") == "cancelled"
    expect(page.locator(".turn.user").last).to_have_text("What is the capital of France?")
    expect(page.get_by_label("Message")).to_have_value("")
    expect(page.locator("#notice")).to_have_text("")
