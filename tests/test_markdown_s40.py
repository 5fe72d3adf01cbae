"""The chat page's markdown as a user reads model answers: tables, nested lists, backslash escapes, links with
parentheses and bare URLs, each as safe as the rest (text escaped, only http(s) links), and long lines rendered
in linear time.

Debian's Chromium (Playwright) against the real stack, as tests/test_page.py drives them; the renderer is called in
the page itself, and one answer streams through the real model with a table added to its text.
"""

import json
import re

from test_page import browser, page, quick_answers, wait_for_end

__all__ = ["browser", "page"]  # the fixtures, shared with tests/test_page.py

LINK_ATTRIBUTES = 'target="_blank" rel="noopener noreferrer nofollow"'


def render(page, *sources: str) -> list[str]:
    """Each of `sources` as the page's renderMarkdown renders it."""
    return page.evaluate("""async (sources) => {
      const { renderMarkdown } = await import("./static/markdown.js");
      return sources.map((source) => renderMarkdown(source));
    }""", list(sources))


def parsed(page, html: str) -> dict:
    """What the browser makes of `html` (parsed in a template: nothing in it runs): the tags and attributes of its
    elements, and its text."""
    return page.evaluate("""(html) => {
      const template = document.createElement("template");
      template.innerHTML = html;
      const elements = [...template.content.querySelectorAll("*")];
      return {tags: elements.map((el) => el.tagName.toLowerCase()),
              attributes: elements.flatMap((el) => el.getAttributeNames()),
              hrefs: elements.filter((el) => el.hasAttribute("href")).map((el) => el.getAttribute("href")),
              text: template.content.textContent};
    }""", html)


def test_a_table_renders_as_a_table_with_its_cells_escaped(page):
    # A GitHub-style table showed as its lines of pipes and dashes.
    table, unsafe = render(
        page,
        "Fruit prices:\n| Fruit | Price |\n|:------|------:|\n| **apple** | 3 |\n| `a\\|b` | 10 | extra |\n"
        "| pear |\nAfter.",
        "| a | b |\n|---|:-:|\n| <img src=x onerror=alert(1)> | [x](javascript:alert(1)) |\n"
        "| <script>alert(1)</script> | [y](https://x.example/\" onclick=\"alert(1)) |",
    )
    assert table == (
        "<p>Fruit prices:</p><table><thead><tr>"
        '<th style="text-align: left">Fruit</th><th style="text-align: right">Price</th></tr></thead><tbody>'
        '<tr><td style="text-align: left"><strong>apple</strong></td><td style="text-align: right">3</td></tr>'
        '<tr><td style="text-align: left"><code>a|b</code></td><td style="text-align: right">10</td></tr>'
        '<tr><td style="text-align: left">pear</td><td style="text-align: right"></td></tr>'
        "</tbody></table><p>After.</p>"), table
    # The quote ends the bare URL before it: the onclick stays text.
    shown = parsed(page, unsafe)
    assert shown["tags"] == ["table", "thead", "tr", "th", "th", "tbody", "tr", "td", "td", "tr", "td", "td", "a"], \
        shown
    assert set(shown["attributes"]) == {"style", "href", "target", "rel"}, shown
    assert shown["hrefs"] == ["https://x.example/"], shown
    assert "<img src=x onerror=alert(1)>" in shown["text"] and "<script>alert(1)</script>" in shown["text"], shown


def test_a_list_indented_under_an_item_is_nested_in_it(page):
    # An indented "- " or "1. " under an item rendered as one flat list; a blank line between items started a new
    # list, numbered on from the first.
    nested, spaced = render(
        page,
        "- fruit\n  - apple\n    1. green\n    2. red\n  - pear\n- vegetables",
        "1. **Prepare**\n\n   - wash\n   - peel\n\n2. Cook\n\n   Stir often.\n\nEnjoy.",
    )
    assert nested == ("<ul><li>fruit<ul><li>apple<ol><li>green</li><li>red</li></ol></li><li>pear</li></ul></li>"
                      "<li>vegetables</li></ul>"), nested
    assert spaced == ("<ol><li><strong>Prepare</strong><ul><li>wash</li><li>peel</li></ul></li>"
                      "<li><p>Cook</p><p>Stir often.</p></li></ol><p>Enjoy.</p>"), spaced


def test_a_backslash_escape_shows_its_character_not_the_backslash(page):
    # "\*" showed its backslash ("2 \* 3"); an escaped mark must not start emphasis, a heading or a code span.
    escaped, blocks, in_code = render(
        page,
        "2 \\* 3 \\* 4, \\_id\\_, \\`tick\\`, \\<b\\>, and \\\\*em*",
        "\\# not a heading\n1\\. not a list",
        "`a\\*b` stays code",
    )
    assert escaped == "<p>2 * 3 * 4, _id_, `tick`, &lt;b&gt;, and \\<em>em</em></p>", escaped
    assert blocks == "<p># not a heading<br>1. not a list</p>", blocks
    assert in_code == "<p><code>a\\*b</code> stays code</p>", in_code


def test_links_with_parentheses_and_bare_urls_are_links_and_only_http_ones(page):
    # A link whose URL holds parentheses (Wikipedia's) stayed text, and a bare URL was not linked.
    wiki, bare, unsafe = render(
        page,
        "[Foo](https://en.wikipedia.org/wiki/Foo_(bar)) is a [page](https://x.example/a_b).",
        "See https://x.example/a_b_c. Or (https://x.example/p(q)) and **https://x.example/bold**.",
        "javascript:alert(1) xhttps://x.example [x](javascript:alert(1)) "
        'https://x.example/"onmouseover="alert(1) <img src=x onerror=alert(1)>',
    )
    assert wiki == (f'<p><a href="https://en.wikipedia.org/wiki/Foo_(bar)" {LINK_ATTRIBUTES}>Foo</a> is a '
                    f'<a href="https://x.example/a_b" {LINK_ATTRIBUTES}>page</a>.</p>'), wiki
    assert bare == (f'<p>See <a href="https://x.example/a_b_c" {LINK_ATTRIBUTES}>https://x.example/a_b_c</a>. '
                    f'Or (<a href="https://x.example/p(q)" {LINK_ATTRIBUTES}>https://x.example/p(q)</a>) and '
                    f'<strong><a href="https://x.example/bold" {LINK_ATTRIBUTES}>https://x.example/bold</a></strong>.'
                    "</p>"), bare
    shown = parsed(page, unsafe)
    assert shown["tags"] == ["p", "a"], shown
    assert shown["hrefs"] == ['https://x.example/"onmouseover="alert(1)'], shown
    assert set(shown["attributes"]) == {"href", "target", "rel"}, shown


def test_a_long_line_of_unclosed_marks_renders_in_linear_time(page):
    # Each unclosed "**", "~~" or "[" looked for its end through the rest of the line: 238 ms at 32,000 characters,
    # seconds at 100,000. In one pass it takes a few milliseconds.
    took = page.evaluate("""async () => {
      const { renderMarkdown } = await import("./static/markdown.js");
      const took = {};
      for (const mark of ["**", "~~", "__", "["]) {
        const line = `${mark}a `.repeat(Math.ceil(100_000 / (mark.length + 2)));
        const start = performance.now();
        const html = renderMarkdown(line);
        took[mark] = performance.now() - start;
        if (!html.startsWith(`<p>${mark}a ${mark}a`)) throw new Error(`rendered as ${html.slice(0, 80)}`);
      }
      return took;
    }""")
    assert all(ms < 250 for ms in took.values()), took


def test_the_cursor_streams_in_the_last_cell_of_a_table(page, stack):
    # The cursor goes in the innermost block the answer ends with; a table was not one, and the cursor stood under
    # it, on a line of its own.
    def end_with_a_table(socket):
        server = socket.connect_to_server()

        def forward(message):
            chunk = json.loads(message)
            if not chunk.get("done") and not chunk.get("error_code"):
                chunk["text"] += "\n\n| Sea | Depth |\n|---|---|\n| Baltic | 55 m"
            socket.send(json.dumps(chunk))

        server.on_message(forward)

    page.route_web_socket(re.compile(r"/v1/jobs/[^/]+/ws$"), end_with_a_table)
    page.evaluate("""() => {
      window.cursors = [];
      new MutationObserver(() => {
        const box = document.querySelector("#conversation > .turn.assistant:last-child .markdown");
        const cursor = box && box.querySelector(".cursor");
        if (cursor && box.querySelector("table")) {
          window.cursors.push(`${cursor.parentElement.tagName}:${cursor.parentElement.textContent}`);
        }
      }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
    }""")
    quick_answers(page)
    page.get_by_label("Message").fill("Name a sea.")
    page.get_by_label("Message").press("Enter")
    assert wait_for_end(page) == "succeeded"
    cursors = page.evaluate("window.cursors")
    assert cursors and all(place == "TD:55 m▌" for place in cursors), cursors
