"""The chat page as a user sees it stream code, and picks an image again after a refusal.

Debian's Chromium (Playwright) against the real stack and the real default model, as tests/test_page.py drives them.
"""

import re

from test_page import browser, hugely_many_pixels_png, job_record, last_answer, page, \
    quick_answers, wait_for_end

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

# Every state the streaming answer showed: its whole text, and the text of its code blocks.
RECORD_RENDERED = """() => {
  window.rendered = [];
  new MutationObserver(() => {
    const box = document.querySelector("#conversation > .turn.assistant:last-child .markdown");
    if (!box) return;
    const state = {text: box.textContent, code: [...box.querySelectorAll("pre")].map((pre) => pre.textContent)};
    if (JSON.stringify(state) !== JSON.stringify(window.rendered.at(-1))) window.rendered.push(state);
  }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
}"""


def test_a_code_block_streams_as_code_never_as_its_backticks(page, stack):
    # The cursor was written into the text before it was rendered: "```python▌" was no fence, so each code block
    # showed its opening backticks as text, and its closing ones as code, until the next line came.
    quick_answers(page)
    page.evaluate(RECORD_RENDERED)
    page.get_by_label("Message").fill("Write a Python function that adds two numbers, in a markdown code block.")
    page.get_by_label("Message").press("Enter")
    assert wait_for_end(page) == "succeeded"
    answer = job_record(stack.base_url, last_answer(page).get_attribute("data-job-id"))["text"]
    assert "```" in answer, f"the model wrote no code block, so the test shows nothing: {answer!r}"
    rendered = page.evaluate("window.rendered")
    streamed = [state for state in rendered if state["text"].endswith("▌")]
    assert len(streamed) > 1 and any(state["code"] for state in streamed), rendered
    shown = [state["text"] for state in rendered if "```" in state["text"]]
    assert not shown, f"backticks shown while the answer streamed: {shown}"
    assert "▌" not in last_answer(page).locator(".markdown").text_content()


def test_an_image_made_smaller_after_a_refusal_is_taken_when_picked_again(page, tmp_path):
    # The refusal asks for a smaller image; the file made smaller under the same name and picked again fired no
    # change (the file input still held it), so nothing happened and the refusal stayed.
    poster = hugely_many_pixels_png(tmp_path / "poster.png", 20_000, 20_000)
    chooser = page.get_by_label("Choose an image")
    chooser.set_input_files(poster)
    page.get_by_text(re.compile(r"poster\.png is 20000×20000 pixels")).wait_for(timeout=10_000)

    hugely_many_pixels_png(poster, 1000, 1000)
    chooser.set_input_files(poster)
    page.locator("#attachment-name").get_by_text("poster.png").wait_for(timeout=10_000)
    assert page.locator("#notice").inner_text() == ""


def test_markdown_keeps_a_heading_s_last_hash_and_a_fence_s_info_string(page):
    # "## Using C#" lost its "#"; a fence with more than a language ("```js title=app.js") was no fence, and its
    # closing fence opened a code block that took the rest of the answer.
    heading, fence, inline = page.evaluate("""async () => {
      const { renderMarkdown } = await import("./static/markdown.js");
      return [renderMarkdown("## Using C#\\n# Closed #"), renderMarkdown("```js title=app.js\\nlet a;\\n```\\nAfter."),
              renderMarkdown("```one line```\\nAfter.")];
    }""")
    assert heading == "<h4>Using C#</h4><h3>Closed</h3>", heading
    assert fence == '<pre><code class="language-js">let a;</code></pre><p>After.</p>', fence
    assert inline == "<p>``<code>one line</code>``<br>After.</p>", inline

