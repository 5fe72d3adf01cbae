// Safe markdown for model output and user text: every character of the input is HTML-escaped,
// and the only tags that reach the page are the ones written here. Raw HTML is shown as text.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** `text` with the five HTML-significant characters escaped. */
export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// A fence is three or more backticks or tildes (CommonMark): one of four, which holds a block that shows a fence of
// three, was no fence. Its info string is its language and whatever follows it ("```js title=app.js"; no backtick
// after backticks, as in "```code```"): a line with more than the language was no fence, and the fence closing its
// block opened one that took the rest of the answer for code.
const FENCE = /^\s*(?:(`{3,})\s*([\w+#.-]*)[^`]*|(~{3,})\s*([\w+#.-]*).*)$/;
// A block is closed by a fence of its character at least as long, with nothing after it.
const CLOSING_FENCE = /^\s*(`{3,}|~{3,})\s*$/;

/** Whether `line` closes the code block that fence `opening` ("````") opened. */
function closesFence(line, opening) {
  const closing = line.match(CLOSING_FENCE);
  return Boolean(closing) && closing[1][0] === opening[0] && closing[1].length >= opening.length;
}

/**
 * Render `source` as HTML: paragraphs and line breaks, headings, bullet and numbered lists (nested by indentation),
 * tables, block quotes, rules, fenced code blocks (an unclosed fence runs to the end, as while streaming), inline
 * code, bold, italic, strike-through, backslash escapes, and http(s) links, written as links or bare.
 */
export function renderMarkdown(source) {
  const lines = String(source).replace(/\0/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [];
  let quote = [];
  // The open lists, outermost first: each one after the first is nested in the last item of the one before it.
  let lists = [];
  let blankInList = false; // a blank line went by in the open list: indented text after it is a new paragraph

  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushQuote = () => {
    if (quote.length) out.push(`<blockquote><p>${quote.map(inline).join("<br>")}</p></blockquote>`);
    quote = [];
  };
  const flushList = () => {
    if (lists.length) out.push(listHtml(lists[0]));
    lists = [];
  };
  const flushAll = () => { flushParagraph(); flushQuote(); flushList(); };

  /** A list of `type` (its first number `start`) whose items start `indent` columns in, nested in the innermost
   * open list's last item (or the outermost). */
  const openList = (type, start, indent) => {
    const list = { type, start, indent, items: [] };
    if (lists.length) lists.at(-1).items.at(-1).lists.push(list);
    lists.push(list);
  };
  const addItem = (type, start, indent, text) => {
    // The lists indented deeper than this item end; one indented less holds it.
    while (lists.length > 1 && indent < lists.at(-1).indent) lists.pop();
    const innermost = lists.at(-1);
    if (!innermost || (indent > innermost.indent && lists.length < MAX_LIST_DEPTH)) {
      openList(type, start, indent);
    } else if (innermost.type !== type) {
      // Another kind of item at the same depth starts a list of its own.
      if (lists.length === 1) flushList();
      else lists.pop();
      openList(type, start, indent);
    }
    lists.at(-1).items.push({ paragraphs: [text], lists: [] });
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      flushAll();
      const [marks, language] = fence[1] ? [fence[1], fence[2]] : [fence[3], fence[4]];
      const code = [];
      for (i++; i < lines.length && !closesFence(lines[i], marks); i++) code.push(lines[i]);
      const lang = language ? ` class="language-${escapeHtml(language)}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    if (!line.trim()) {
      flushParagraph();
      flushQuote();
      // Models space their lists out: a blank line before the next item, or before an item's indented text, leaves
      // the list open (it closed, and the items after it were a list of their own, a nested one flat).
      if (lists.length && listGoesOn(lines, i + 1)) blankInList = true;
      else flushList();
      continue;
    }
    const afterBlank = blankInList;
    blankInList = false;
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
    const table = tableAt(lines, i);
    if (table) {
      flushAll();
      out.push(table.html);
      i = table.end - 1;
      continue;
    }
    const item = line.match(/^(\s*)(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/);
    if (item) {
      flushParagraph();
      addItem(item[2] ? "ul" : "ol", item[3] ? Number(item[3]) : 1, columns(item[1]), item[4]);
      continue;
    }
    if (lists.length && /^\s+\S/.test(line)) {
      const paragraphs = lists.at(-1).items.at(-1).paragraphs;
      if (afterBlank) paragraphs.push(line.trim());
      else paragraphs[paragraphs.length - 1] += ` ${line.trim()}`;
      continue;
    }
    flushList();
    paragraph.push(line);
  }
  flushAll();
  return out.join("");
}

// Deeper items stay at this depth: a line of thousands, each indented one more, took the page's stack.
const MAX_LIST_DEPTH = 12;
const LIST_ITEM = /^\s*(?:[-*+]|\d{1,9}[.)])\s+\S/;

/** Whether the list open before a blank line goes on: the next line with text is an item, or indented. */
function listGoesOn(lines, from) {
  let next = from;
  while (next < lines.length && !lines[next].trim()) next++;
  return next < lines.length && (LIST_ITEM.test(lines[next]) || /^\s/.test(lines[next]));
}

/** How many columns the white space `indent` takes, a tab to the next multiple of 4. */
function columns(indent) {
  let width = 0;
  for (const c of indent) width = c === "\t" ? width + 4 - (width % 4) : width + 1;
  return width;
}

function listHtml(list) {
  const start = list.type === "ol" && list.start !== 1 ? ` start="${list.start}"` : "";
  const items = list.items.map((item) => {
    // An item of several paragraphs (a blank line and indented text) shows them apart.
    const text = item.paragraphs.length === 1 ? inline(item.paragraphs[0])
      : item.paragraphs.map((paragraph) => `<p>${inline(paragraph)}</p>`).join("");
    return `<li>${text}${item.lists.map(listHtml).join("")}</li>`;
  });
  return `<${list.type}${start}>${items.join("")}</${list.type}>`;
}

/** The cells of a table row: the text between its unescaped pipes (an escaped one is a pipe in its cell, in a code
 * span too), without the pipes that open and close the row. */
function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.replaceAll("\\|", "|").trim());
}

const ALIGNMENTS = { "::": "center", ":": "left", "-:": "right" };

/** The table (GitHub's syntax) that starts at `lines[start]`: `{html, end}` (the index of the line after it), or
 * null where no table starts. Its second line is the delimiter row (`|---|:--:|`), with a cell for each heading. */
function tableAt(lines, start) {
  if (start + 1 >= lines.length || !lines[start].includes("|") || !lines[start + 1].includes("|")) return null;
  const headings = tableCells(lines[start]);
  const delimiters = tableCells(lines[start + 1]);
  if (delimiters.length !== headings.length || !delimiters.every((cell) => /^:?-+:?$/.test(cell))) return null;
  const aligns = delimiters.map((cell) => ALIGNMENTS[cell[0] === ":" ? (cell.endsWith(":") ? "::" : ":")
    : cell.endsWith(":") ? "-:" : ""]);
  const cell = (tag, text, align) => `<${tag}${align ? ` style="text-align: ${align}"` : ""}>${inline(text)}</${tag}>`;
  const row = (tag, texts) => `<tr>${aligns.map((align, n) => cell(tag, texts[n] ?? "", align)).join("")}</tr>`;
  let end = start + 2;
  const rows = [];
  for (; end < lines.length && lines[end].trim() && lines[end].includes("|"); end++) rows.push(tableCells(lines[end]));
  const body = rows.length ? `<tbody>${rows.map((texts) => row("td", texts)).join("")}</tbody>` : "";
  return { html: `<table><thead>${row("th", headings)}</thead>${body}</table>`, end };
}

const LINK_ATTRIBUTES = 'target="_blank" rel="noopener noreferrer nofollow"';
const link = (url, labelHtml) => `<a href="${escapeHtml(url)}" ${LINK_ATTRIBUTES}>${labelHtml}</a>`;

// ASCII punctuation, which a backslash escapes.
const ESCAPABLE = "!-\\/:-@\\[-`{-~";
// A code span, or a backslash escape, from the left: an escaped backtick opens no code span, and a backslash inside
// a code span is code.
const CODE_OR_ESCAPE = new RegExp(`\`([^\`]+)\`|\\\\([${ESCAPABLE}])`, "g");
// A link's label holds no bracket (one that did made the search quadratic on a line of many "["; an escaped one is
// held by then); its URL may hold parentheses in pairs, as Wikipedia's do.
const LINK = /\[([^[\]\n]+)\]\((https?:\/\/(?:[^\s()\0]|\([^\s()\0]*\))+)\)/g;
const ANGLE_URL = /<(https?:\/\/[^\s<>\0]+)>/g;
const BARE_URL = /(?<![\w/])https?:\/\/[^\s<>\0]+/g;

/** A bare URL's link and the text after it: punctuation that ends the sentence, and a closing parenthesis with no
 * opening one in the URL ("(see https://x.example/a)"), are not the URL's. */
function splitBareUrl(url) {
  let balance = 0;
  for (const c of url) balance += c === "(" ? 1 : c === ")" ? -1 : 0;
  let end = url.length;
  for (;;) {
    const last = url[end - 1];
    if ("?!.,:;*_~'\"".includes(last)) end--;
    else if (last === ")" && balance < 0) { end--; balance++; }
    else break;
  }
  return [url.slice(0, end), url.slice(end)];
}

/** One line of text with its inline markup. Code spans, escaped characters and links are set aside first, so
 * emphasis never reaches inside them; what they hold is escaped on its own. A link's label may hold code spans set
 * aside before it, so what is put back is itself put back in turn (its URL may not: a code span there leaves the
 * link as text). */
function inline(text) {
  const held = [];
  const hold = (html) => `\0${held.push(html) - 1}\0`;
  const restore = (html) => html.replace(/\0(\d+)\0/g, (_, n) => restore(held[Number(n)]));
  let s = text.replace(CODE_OR_ESCAPE, (_, code, escaped) =>
    hold(code === undefined ? escapeHtml(escaped) : `<code>${escapeHtml(code)}</code>`));
  s = s.replace(LINK, (_, label, url) => hold(link(url, emphasis(escapeHtml(label)))));
  s = s.replace(ANGLE_URL, (_, url) => hold(link(url, escapeHtml(url))));
  s = s.replace(BARE_URL, (found, at, whole) => {
    // A URL that runs into a code span or an escape is not linked: cut short, it would lead elsewhere.
    if (whole[at + found.length] === "\0") return found;
    const [url, after] = splitBareUrl(found);
    return hold(link(url, escapeHtml(url))) + after;
  });
  return restore(emphasis(escapeHtml(s)));
}

function emphasis(s) {
  s = wrapPairs(s, "**", "strong", false);
  s = wrapPairs(s, "__", "strong", true);
  s = s
    .replace(/(^|[^*\w])\*([^\s*](?:[^*]*[^\s*])?)\*(?![*\w])/g, "$1<em>$2</em>")
    .replace(/(^|\W)_([^\s_](?:[^_]*[^\s_])?)_(?!\w)/g, "$1<em>$2</em>");
  return wrapPairs(s, "~~", "del", false);
}

const SPACE = /\s/;
const WORD = /\w/;

/**
 * `s` with the text between each pair of `mark`s wrapped in `tag`: the opening mark is followed by other than white
 * space, the closing one follows other than white space (and with `apart`, neither touches a word outside them).
 * The first closing mark after an opening one closes it. One pass: the regex that did this (`\*\*(?=\S)(.*?\S)\*\*`)
 * looked for a closing mark from every unclosed one, quadratic on a line of them.
 */
function wrapPairs(s, mark, tag, apart) {
  const size = mark.length;
  const opens = (at) => at + size < s.length && !SPACE.test(s[at + size]) && !(apart && at > 0 && WORD.test(s[at - 1]));
  const closes = (at) => !SPACE.test(s[at - 1]) && !(apart && at + size < s.length && WORD.test(s[at + size]));
  let out = "";
  let copied = 0;
  let at = s.indexOf(mark);
  while (at !== -1) {
    if (!opens(at)) {
      at = s.indexOf(mark, at + 1);
      continue;
    }
    let end = s.indexOf(mark, at + size + 1);
    while (end !== -1 && !closes(end)) end = s.indexOf(mark, end + 1);
    // A later mark would look for its closing one further on, where there is none.
    if (end === -1) break;
    out += `${s.slice(copied, at)}<${tag}>${s.slice(at + size, end)}</${tag}>`;
    copied = end + size;
    at = s.indexOf(mark, copied);
  }
  return out + s.slice(copied);
}
