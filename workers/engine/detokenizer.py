"""Turning generated token ids into streamed text, one token at a time, and finding stop strings in it.

Two rules make the deltas safe to send as they come: text is decoded over a
small window of previous tokens (vLLM/TGI's prefix/read offsets) so merges and
leading spaces come out as in a full decode, and text that is a broken UTF-8
character or could be the start of the stop string is held back until it is
settled. The deltas therefore never have to be taken back, and joined they
equal the final text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# How many prompt tokens to decode with the first generated ones, so the first
# piece of text comes out as it would inside a full decode (same as vLLM).
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def special_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of `text` when it is exactly one special token of the tokenizer ("</s>", "<|im_end|>"), else None."""
    for token_id, token in tokenizer.added_tokens_decoder.items():
        if token.special and token.content == text:
            return token_id
    if text in tokenizer.all_special_tokens:
        return tokenizer.convert_tokens_to_ids(text)
    return None


class Detokenizer:
    """Incremental decoding of one sequence, with its stop string.

    Feed each generated token to `add`, which returns the new text that is
    safe to stream ("" when nothing is settled yet). `stopped` turns True once
    the stop string appears; the text then ends just before it. Call `finish`
    when the sequence ends for any reason, to get the text still held back.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], stop: str | None = None):
        self._tokenizer = tokenizer
        self._stop = stop or None
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text streamed so far (the concatenation of the deltas)."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it settles (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        new_text = self._decode_new(allow_partial=False)
        if not new_text:
            return ""
        search_from = max(0, len(self._text) - len(self._stop) + 1) if self._stop else 0
        self._text += new_text
        if self._stop:
            stop_at = self._text.find(self._stop, search_from)
            if stop_at >= 0:
                self._text = self._text[:stop_at]
                self.stopped = True
                return self._release(len(self._text))
        return self._release(len(self._text) - self._stop_prefix_len())

    def finish(self) -> str:
        """The sequence is over: return the text still held back (partial characters, a stop prefix)."""
        if not self.stopped:
            self._text += self._decode_new(allow_partial=True)
        return self._release(len(self._text))

    def _decode_new(self, allow_partial: bool) -> str:
        """Text added by the tokens after the read offset, decoded with the window before it as context."""
        decode = self._tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len(full) <= len(prefix):
            return ""
        # A trailing U+FFFD is a multi-byte character whose last bytes are in
        # tokens not generated yet: wait for them.
        if full.endswith(REPLACEMENT_CHAR) and not allow_partial:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that could be the start of the stop string."""
        if not self._stop:
            return 0
        for length in range(min(len(self._stop) - 1, len(self._text)), 0, -1):
            if self._text.endswith(self._stop[:length]):
                return length
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta
