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
        self._stops = tuple(_StopMatcher(s) for s in dict.fromkeys(s for s in stops if s))
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
        new_text, partial = self._decode_new(allow_partial=False)
        if partial:
            # Held back as half a character: the text before it may complete a stop string already (" " + the first
            # byte of a CJK character, with the stop " "), where the sequence must end, not tokens later.
            return self._release(len(self._text)) if self._stop_before(new_text.rstrip(REPLACEMENT_CHAR)) else ""
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
            self._extend(self._decode_new(allow_partial=True)[0])
        return self._release(len(self._text))

    def _extend(self, new_text: str) -> bool:
        """Append new text; if it completes a stop string, cut the text before the earliest one to begin. Returns
        whether it stopped."""
        old_len = len(self._text)
        self._text += new_text
        starts = [end - len(matcher.stop) for matcher in self._stops
                  if (end := matcher.feed(self._text, old_len)) is not None]
        if starts:
            self._text = self._text[: min(starts)]
            self.stopped = True
        return self.stopped

    def _stop_before(self, settled: str) -> bool:
        """Whether `settled`, the text of tokens held back before a broken character, completes a stop string: if
        so the text is cut before it and `stopped` turns True; if not, nothing changes (the text comes again, whole,
        once the character does)."""
        if not (settled and self._stops):
            return False
        matched = [matcher.matched for matcher in self._stops]
        if self._extend(settled):
            return True
        self._text = self._text[: len(self._text) - len(settled)]
        for matcher, length in zip(self._stops, matched):
            matcher.matched = length
        return False

    def _decode_new(self, allow_partial: bool) -> tuple[str, bool]:
        """Text added by the tokens after the read offset, decoded with the window before it as context, and whether
        it ends in a broken character, held back (the offsets stay) unless `allow_partial`."""
        decode = self._tokenizer.decode
        prefix = decode(
            self._ids[self._prefix_offset : self._read_offset],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if len(full) <= len(prefix):
            return "", False
        # A trailing U+FFFD is a multi-byte character whose last bytes are in
        # tokens not generated yet: wait for them.
        if full.endswith(REPLACEMENT_CHAR) and not allow_partial:
            return full[len(prefix) :], True
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :], False

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that could be the start of a stop string."""
        return max((matcher.matched for matcher in self._stops), default=0)

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta


class _StopMatcher:
    """One stop string, found in a text fed to it as it grows (Knuth-Morris-Pratt): `matched` is the length of the
    longest end of the text so far that is a start of the stop.

    The work is linear in the text, whatever the stop's length: the held-back prefix was found by trying every
    length of the stop at every token, which made a job with long stop strings (100,000 characters, about as much
    text generated) spend 160 ms of the engine's thread a token, every row of its batch waiting. The failure table
    is built only as far as a match has come, so a long stop costs no more than the text it is compared with.
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.matched = 0
        # failure[i]: the length of the longest proper prefix of stop[: i + 1] that is also its suffix.
        self._failure = [0]
        self._border = 0  # failure's last entry, to extend it from

    def feed(self, text: str, start: int) -> int | None:
        """Take text[start:]; return the end (exclusive) of the first occurrence of the stop completed in it, or
        None (`matched` is then the longest end of the text that starts the stop)."""
        stop, matched = self.stop, self.matched
        for at in range(start, len(text)):
            char = text[at]
            while matched and char != stop[matched]:
                matched = self._failure[matched - 1]
            if char == stop[matched]:
                matched += 1
                if matched == len(stop):
                    self.matched = matched
                    return at + 1
                if matched > len(self._failure):
                    self._extend_failure()
        self.matched = matched
        return None

    def _extend_failure(self) -> None:
        """One more entry of the failure table."""
        stop, failure, border = self.stop, self._failure, self._border
        index = len(failure)
        while border and stop[index] != stop[border]:
            border = failure[border - 1]
        if stop[index] == stop[border]:
            border += 1
        failure.append(border)
        self._border = border
