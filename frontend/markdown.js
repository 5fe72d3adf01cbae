// Safe markdown for model output and user text: every character of the input is HTML-escaped,
// and the only tags that reach the page are the ones written here. Raw HTML is shown as text.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** `text` with the five HTML-significant characters escaped. */
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// A fence's info string is its language and whatever follows it ("```js title=app.js"; no backtick or tilde, as in
// "```code```"): a line with more than the language was no fence, and the fence closing its block opened one that
// took the rest of the answer for code.
const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)[^`~]*$/;

/**
 * Render `source` as HTML: paragraphs and line breaks, headings, bullet and numbered lists,
 * block quotes, rules, fenced code blocks (an unclosed fence runs to the end, as while
 * streaming), inline code, bold, italic, strike-through, and http(s) links.
 */
export function renderMarkdown(source) {
  const lines = String(source).replace(/\0/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [];
  let quote = [];
  let list = null;

  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushQuote = () => {
    if (quote.length) out.push(`<blockquote><p>${quote.map(inline).join("<br>")}</p></blockquote>`);
    quote = [];
  };
  const flushList = () => {
    if (!list) return;
    const start = list.type === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
    out.push(`<${list.type}${start}>${list.items.map((item) => `<li>${inline(item)}</li>`).join("")}</${list.type}>`);
    list = null;
  };
  const flushAll = () => { flushParagraph(); flushQuote(); flushList(); };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flushAll();
      const code = [];
      for (i++; i < lines.length && lines[i].trim() !== fence[1]; i++) code.push(lines[i]);
      const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    if (!line.trim()) { flushAll(); continue; }
    // Closing #s count only after a space: "## Using C#" lost its last character.
    const heading = line.match(/^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/);
    if (heading) {
      flushAll();
      const level = Math.min(heading[1].length + 2, 6); // inside a chat bubble, # is a small heading
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      continue;
    }
    if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) { flushAll(); out.push("<hr>"); continue; }
    const quoted = line.match(/^\s{0,3}>\s?(.*)$/);
    if (quoted) { flushParagraph(); flushList(); quote.push(quoted[1]); continue; }
    flushQuote();
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*(\d{1,9})[.)]\s+(.*)$/);
    if (bullet || numbered) {
      flushParagraph();
      const type = bullet ? "ul" : "ol";
      if (list && list.type !== type) flushList();
      if (!list) list = { type, items: [], start: numbered ? Number(numbered[1]) : 1 };
      list.items.push(bullet ? bullet[1] : numbered[2]);
      continue;
    }
    if (list && /^\s+\S/.test(line)) { list.items[list.items.length - 1] += ` ${line.trim()}`; continue; }
    flushList();
    paragraph.push(line);
  }
  flushAll();
  return out.join("");
}

/** One line of text with its inline markup. Code spans and links are set aside first, so
 * emphasis never reaches inside them; what they hold is escaped on its own. A link's label may
 * hold code spans set aside before it, so what is put back is itself put back in turn (its URL
 * may not: a code span there leaves the link as text). */
function inline(text) {
  const held = [];
  const hold = (html) => `\0${held.push(html) - 1}\0`;
  const restore = (html) => html.replace(/\0(\d+)\0/g, (_, n) => restore(held[Number(n)]));
  let s = text.replace(/`([^`]+)`/g, (_, code) => hold(`<code>${escapeHtml(code)}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()\0]+)\)/g, (_, label, url) =>
    hold(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer nofollow">${emphasis(escapeHtml(label))}</a>`));
  return restore(emphasis(escapeHtml(s)));
}

function emphasis(s) {
  return s
    .replace(/\*\*(?=\S)(.*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|\W)__(?=\S)(.*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*([^\s*](?:[^*]*[^\s*])?)\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|\W)_([^\s_](?:[^_]*[^\s_])?)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)(.*?\S)~~/g, "<del>$1</del>");
}
