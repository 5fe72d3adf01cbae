"""Turning generated token ids into streamed text, one token at a time, and finding stop strings in it.

Two rules make the deltas safe to send as they come: text is decoded over a
small window of previous tokens (vLLM/TGI's prefix/read offsets) so merges and
leading spaces come out as in a full decode of the generated ids, and text that
is a broken UTF-8 character or could be the start of a stop string is held back
until it is settled. The deltas therefore never have to be taken back, and
joined they equal the final text.

The text is that of the generated ids alone, as the original streams it
(TextIteratorStreamer with skip_prompt): no prompt tokens are decoded with the
first ones, or a SentencePiece tokenizer (Llama, Vicuna) would start the answer
with the space of its first token ("▁The" reads "The" at the start of a text).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# How many ids of a context to decode with the first generated ones (as vLLM's prefix window).
CONTEXT_TOKENS = 5


def special_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of `text` when it is exactly one special token of the tokenizer ("</s>", "<|im_end|>"), else None."""
    for token_id, token in tokenizer.added_tokens_decoder.items():
        if token.special and token.content == text:
            return token_id
    if text in tokenizer.all_special_tokens:
        return tokenizer.convert_tokens_to_ids(text)
    return None


class Detokenizer:
    """Incremental decoding of one sequence, with its stop strings.

    Feed each generated token to `add`, which returns the new text that is
    safe to stream ("" when nothing is settled yet). `stopped` turns True once
    any stop string appears; the text then ends just before the earliest one.
    Call `finish` when the sequence ends for any reason, to get the text still
    held back.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: str | Sequence[str] | None = None,
        context_ids: Sequence[int] = (),
    ):
        """`context_ids`: text the generated ids go on from (a job resumed after its worker died goes on after the
        text it had): its last few ids are decoded with the first generated ones, so a SentencePiece token's
        space ("▁world" after "Hello") stays, as in a decode of the whole; none of its text is emitted."""
        self._tokenizer = tokenizer
        stops = (stop,) if isinstance(stop, str) else (stop or ())
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._ids = list(context_ids[-CONTEXT_TOKENS:]) if context_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
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
        if self._extend(new_text):
            return self._release(len(self._text))
        return self._release(len(self._text) - self._stop_prefix_len())

    def finish(self) -> str:
        """The sequence is over: return the text still held back (partial characters, a stop prefix).

        Text held back as a partial character may complete a stop string too (" " + half a character after
        "Q:" with the stop "Q: "): it is cut there, and `stopped` turns True.
        """
        if not self.stopped:
            self._extend(self._decode_new(allow_partial=True))
        return self._release(len(self._text))

    def _extend(self, new_text: str) -> bool:
        """Append new text; if it completes a stop string, cut the text before it. Returns whether it stopped."""
        old_len = len(self._text)
        self._text += new_text
        stop_at = self._earliest_stop(old_len)
        if stop_at is not None:
            self._text = self._text[:stop_at]
            self.stopped = True
        return self.stopped

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

    def _earliest_stop(self, old_len: int) -> int | None:
        """Where the earliest stop string that the text added after `old_len` completes begins, or None.

        Each stop is searched only where it could end in the new text: earlier
        matches would have stopped an earlier call.
        """
        found = [
            self._text.find(stop, max(0, old_len - len(stop) + 1))
            for stop in self._stops
        ]
        found = [at for at in found if at >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that could be the start of a stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta
