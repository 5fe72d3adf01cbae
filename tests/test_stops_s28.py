"""Stop strings found as the text grows: the same answers as a search of the whole text, in linear time."""

import random
import time

import pytest
from transformers import AutoTokenizer

from workers.engine.detokenizer import Detokenizer, _StopMatcher


def longest_held_back(text: str, stop: str) -> int:
    """The longest end of `text` that is a proper start of `stop`, by trying every length."""
    return max((length for length in range(1, min(len(stop) - 1, len(text)) + 1) if text.endswith(stop[:length])),
               default=0)


def test_a_stop_matcher_agrees_with_a_search_of_the_whole_text():
    # Small alphabets make overlapping, periodic stops and partial matches common.
    rng = random.Random(28)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "aab", "xy🙂"])
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
        matcher, text = _StopMatcher(stop), ""
        while len(text) < 40:
            chunk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            old = len(text)
            text += chunk
            end = matcher.feed(text, old)
            first = text.find(stop, max(0, old - len(stop) + 1))
            if first >= 0:
                assert end == first + len(stop), (stop, text, old)
                break
            assert end is None, (stop, text)
            assert matcher.matched == longest_held_back(text, stop), (stop, text)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def test_long_stop_strings_cost_the_engine_no_more_than_the_text(tokenizer):
    # Four stops of 100,000 characters and about 40,000 characters of text, as a probe sent them: every token tried
    # every length of every stop (about 160 ms of the engine's thread a token by the end, every row of the batch
    # waiting: 38 s over the job). Now the work is linear in the text; 5 s is over 30 times what it takes here.
    stops = [chr(code) * 100_000 for code in (1, 2, 3, 4)] + ["#" * 50_000 + "!"]
    ids = tokenizer.encode("\n".join(["#" * 80] * 500), add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, stop=stops)
    started = time.thread_time()
    streamed = "".join(detokenizer.add(token) for token in ids)
    spent = time.thread_time() - started
    streamed += detokenizer.finish()
    assert not detokenizer.stopped and streamed == detokenizer.text == tokenizer.decode(ids)
    assert spent < 5, f"{spent:.1f} s of CPU for {len(ids)} tokens"


def test_a_long_stop_is_found_and_held_back_as_a_short_one(tokenizer):
    stop = "ab" * 3000 + "c"
    text = "x" + "ab" * 2500 + "y" + "ab" * 3000 + "c tail"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, stop=[stop, "never"])
    streamed = ""
    for token in ids:
        streamed += detokenizer.add(token)
        assert stop not in streamed
        if "y" in streamed:
            # After "y", every "ab" could still be the stop's start: all of it is held back.
            assert streamed.endswith("y"), streamed[-20:]
        if detokenizer.stopped:
            break
    streamed += detokenizer.finish()
    assert detokenizer.stopped and streamed == detokenizer.text == "x" + "ab" * 2500 + "y"
