"""The chat page used with the keyboard alone, a screen reader, or a phone-sized (or 200 % zoomed) screen.

Debian's Chromium (Playwright) against the real stack, as tests/test_page.py drives it; what a screen reader is told
is read from the page's accessibility tree (Playwright's ARIA snapshot) and its live region's attributes.
"""

from pathlib import Path

from test_page import ANSWER_TIMEOUT_MS, ask, browser, last_answer, page, wait_for_end

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

EXAMPLE_IMAGE = Path(__file__).parents[1] / "frontend/examples/shapes.png"

# WCAG's contrast ratio of two CSS colours (rgb()/rgba(), alpha laid over `under`), in the page itself.
CONTRAST = """
const rgb = (text) => text.match(/[\\d.]+/g).map(Number);
const over = (top, under) => { const a = top.length > 3 ? top[3] : 1; return [0, 1, 2].map((i) => top[i] * a
  + under[i] * (1 - a)); };
const luminance = (c) => { const [r, g, b] = c.map((v) => { v /= 255;
  return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
const contrast = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p);
  return (x + 0.05) / (y + 0.05); };
const backgroundOf = (el) => { for (let e = el; e; e = e.parentElement) { const c = rgb(getComputedStyle(e)
  .backgroundColor); if (c.length < 4 || c[3] > 0) return over(c, [255, 255, 255]); } return [255, 255, 255]; };
"""

# What the keyboard's focus ring and a field's edge look like against what is around them.
EDGES = "(el) => {" + CONTRAST + """
  const style = getComputedStyle(el);
  const around = backgroundOf(el.parentElement);
  return {ring: style.outlineStyle === "none" ? 0 : parseFloat(style.outlineWidth),
          ringContrast: contrast(over(rgb(style.outlineColor), around), around),
          edgeContrast: contrast(over(rgb(style.borderTopColor), around), around)};
}"""


# Text on screen under WCAG AA's 4.5:1 against what is behind it (a disabled control's text is exempt).
LOW_CONTRAST_TEXT = "() => {" + CONTRAST + """
  const low = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((node) => node.nodeType === 3 && node.textContent.trim());
    if (!own || !el.getClientRects().length || el.closest(":disabled")) continue;
    const ratio = contrast(over(rgb(getComputedStyle(el).color), backgroundOf(el)), backgroundOf(el));
    if (ratio < 4.5) low.push([el.tagName, el.textContent.trim().slice(0, 30), ratio]);
  }
  return low;
}"""


def focused(page) -> str:
    return page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()")


def test_the_keyboard_reaches_every_control_with_a_ring_that_can_be_seen(page):
    # The focus ring was a translucent glow, 1.9:1 against white (WCAG asks 3:1), and the message box's and the model
    # list's edges 1.5:1: neither could be made out on a dim screen.
    controls = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea, summary, '
        + '[tabindex]')].filter((el) => !el.disabled && el.getClientRects().length && el.type !== 'radio')
        .map((el) => el.id || el.textContent.trim())""")
    page.get_by_role("heading", name="llava-queue").click()  # start at the page's top, as a user who just came
    reached = []
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement === document.body"):
            continue  # past the last control: the next Tab starts again at the top
        here = focused(page)
        if here in reached:
            break
        reached.append(here)
        edges = page.evaluate(f"({EDGES})(document.activeElement)")
        assert edges["ring"] >= 2 and edges["ringContrast"] >= 3, (here, edges)
    assert set(controls) <= set(reached), set(controls) - set(reached)
    assert page.evaluate("document.documentElement.lang") == "en" and page.title() == "llava-queue chat"
    for name in ("Message", "Model"):
        edges = page.get_by_label(name).evaluate(EDGES)
        assert edges["edgeContrast"] >= 3, (name, edges)


def test_an_image_is_added_from_the_keyboard_beside_send_on_a_phone(page):
    # On a phone (or at 200 % zoom, where the page is as narrow), "+ Image" beside Send was a label: Tab passed it by,
    # and the image picker it stands for was at the bottom of the page.
    # Playwright takes file choosers over once the first listener is on, asynchronously: on well before the Enter.
    page.on("filechooser", lambda chooser: None)
    for width, height in ((640, 430), (375, 667)):  # 1280 x 860 at 200 % zoom, then a phone
        page.set_viewport_size({"width": width, "height": height})
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert page.evaluate(LOW_CONTRAST_TEXT) == []
        page.get_by_label("Message").focus()
        page.keyboard.press("Tab")
        assert focused(page) == "attach", focused(page)
    attach = page.get_by_role("button", name="Image", exact=True)
    box = attach.bounding_box()
    assert attach.is_visible() and box["x"] + box["width"] <= 375
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(EXAMPLE_IMAGE)
    page.locator("#attachment").wait_for(timeout=10_000)
    assert page.locator("#attachment-name").inner_text() == EXAMPLE_IMAGE.name


def test_a_streamed_answer_is_read_out_once_and_earlier_turns_are_not_read_again(page, stack):
    # The conversation is a live region. Every chunk replaced the answer's text, so a screen reader read the answer
    # out again from its start with each one, the cursor ("left half block") at its end; and every message put the
    # whole conversation back, an earlier answer's error (role=alert) read out again as a new alert.
    page.evaluate("""() => new MutationObserver((records) => {
      const log = document.getElementById("conversation");
      for (const record of records) {
        if (record.target.closest?.(".markdown") && log.getAttribute("aria-busy") !== "true") window.readOut.push(
          log.querySelector(".turn.assistant:last-child .markdown").textContent);
        if (record.target === log) window.removed.push(...[...record.removedNodes].map((node) => node.className));
      }
    }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true})""")
    page.evaluate("window.readOut = []; window.removed = []")
    page.get_by_label("Temperature").fill("0")  # and up to 512 tokens: still streaming when Stop comes
    ask(page, "Write a long story about a lighthouse keeper.")
    page.wait_for_function("window.seen.some(state => state.status === 'running' && state.text.length > 20)",
                           timeout=ANSWER_TIMEOUT_MS)
    streaming = last_answer(page)
    assert streaming.locator(".markdown").text_content().endswith("▌")
    assert "▌" not in streaming.aria_snapshot()
    page.get_by_role("button", name="Stop").click()
    assert wait_for_end(page) == "cancelled"
    final = streaming.locator(".markdown").text_content()
    assert page.evaluate("window.readOut") == [final], "read out while it streamed, or not as it ended"
    assert page.locator("#conversation").get_attribute("aria-busy") == "false"
    alert = page.get_by_role("alert")
    assert alert.inner_text() == "cancelled by the client (error_code: 5)"

    page.get_by_label("Max output tokens").fill("1")
    page.evaluate("window.removed = []; window.firstAnswer = document.querySelector('#conversation > .turn.assistant')")
    ask(page, "Thank you.")
    wait_for_end(page)
    assert page.evaluate("window.removed") == [], "turns on screen were put back"
    assert page.evaluate("window.firstAnswer.isConnected")
    assert page.evaluate("window.readOut.length") == 2
