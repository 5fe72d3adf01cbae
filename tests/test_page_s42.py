"""The chat page as a user meets it when switching models in a conversation with an image, and pasting an image.

Debian's Chromium (Playwright) against the real stack (the default model, text only) and a real tiny LLaVA worker
beside it, as tests/test_page.py drives them.
"""

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import model_workers
from playwright.sync_api import Page, expect
from test_page import ask, browser, job_record, last_answer, open_page, page, quick_answers, wait_for_end
from test_page2_s41 import SHAPES, served

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

LLAVA = "page-tiny-llava"


@contextmanager
def asked_about_an_image(browser, stack, tiny_llava_dir) -> Iterator[tuple[Page, str]]:
    """A page, beside the stack's text-only model and a tiny LLaVA worker, whose conversation has one image that the
    LLaVA model was asked about and answered; yields it with the text-only model's name."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_VISION_TOWER")}
    env.update(LLAVA_QUEUE_MODEL_PATH=str(tiny_llava_dir), LLAVA_QUEUE_DEVICE="cpu", LLAVA_QUEUE_DTYPE="float32")
    with model_workers(stack, env, [LLAVA]):
        deadline = time.monotonic() + 120
        while LLAVA not in served(stack.base_url):  # (model_workers waits for one worker: the stack's own may count)
            assert time.monotonic() < deadline, "the LLaVA worker never announced itself"
            time.sleep(0.3)
        [text_only] = [name for name, model in served(stack.base_url).items() if not model["reads_images"]]
        page = open_page(browser, stack.base_url, f"?model={LLAVA}")
        try:
            quick_answers(page)
            page.get_by_label("Choose an image").set_input_files(SHAPES)
            ask(page, "What shapes are in this picture?")
            assert wait_for_end(page) == "succeeded"
            expect(page.locator(".turn.user .image-note")).to_have_text("")
            yield page, text_only
        finally:
            page.close()


def test_every_image_says_whether_the_model_chosen_now_reads_it(browser, stack, tiny_llava_dir):
    # The note under a sent image was set when the image was asked about, and only then: the image goes again with
    # every message, but after a switch to a text-only model its note still said nothing (or, the other way round,
    # still said the image was not seen by a LLaVA model that now reads it).
    with asked_about_an_image(browser, stack, tiny_llava_dir) as (page, text_only):
        note = page.locator(".turn.user .image-note")
        not_seen = f"{text_only} does not read images: it answers the text alone, without seeing this image."
        page.get_by_label("Model").select_option(text_only)
        expect(note).to_have_text(not_seen)
        ask(page, "And what colour is each?")
        assert wait_for_end(page) == "succeeded"
        record = job_record(stack.base_url, last_answer(page).get_attribute("data-job-id"))
        assert record["model"] == text_only
        expect(note).to_have_text(not_seen)
        expect(note).to_be_visible()

        page.get_by_label("Model").select_option(LLAVA)
        expect(note).to_have_text("")


# Paste at `selector`'s element (the page's body when nothing has the focus) what the clipboard holds after a copy of
# an image named "pasted.png" (with `text` too, when given); returns whether the page left the browser's own paste.
PASTE = """async ([selector, text]) => {
  const blob = await (await fetch("static/examples/shapes.png")).blob();
  const clipboard = new DataTransfer();
  if (text) clipboard.setData("text/plain", text);
  else clipboard.items.add(new File([blob], "pasted.png", {type: "image/png"}));
  return document.querySelector(selector).dispatchEvent(new ClipboardEvent("paste", {clipboardData: clipboard,
                                                                                   bubbles: true, cancelable: true}));
}"""


def test_an_image_pasted_outside_the_message_box_is_attached(page):
    # The image panel says "or drop or paste one", but only the message box took a pasted image: pasted after a click
    # on the panel, it was not attached, and nothing said why.
    page.locator("#dropzone").click(position={"x": 5, "y": 5})
    assert page.evaluate(PASTE, ["body", None]) is False
    page.locator("#attachment").wait_for(timeout=10_000)
    assert page.locator("#attachment-name").inner_text() == "pasted.png"
    # Text pasted into the message box is the browser's to paste.
    assert page.evaluate(PASTE, ["#prompt", "hello"]) is True
