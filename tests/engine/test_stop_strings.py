"""StopStringMatcher on a toy tokenizer whose tokens split words (and stop strings) anywhere."""

from __future__ import annotations

import pytest

from jaxinfer.engine.stop_strings import StopStringMatcher

VOCAB = ["Hel", "lo", " wo", "rld", "!", " S", "TOP", " here", "<eos>"]


class ToyTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        pieces = [VOCAB[i] for i in ids]
        if skip_special_tokens:
            pieces = [p for p in pieces if p != "<eos>"]
        return "".join(pieces)


def _feed(matcher: StopStringMatcher, ids: list[int]) -> int | None:
    """-> how many tokens were fed when a stop string matched (None: never)."""
    for n in range(1, len(ids) + 1):
        if matcher.update(ids[:n]) is not None:
            return n
    return None


SENTENCE = [0, 1, 2, 3, 4, 5, 6, 7]  # "Hello world! STOP here"


@pytest.mark.parametrize(
    "stop,include,matched_at,text",
    [
        (["lo wo"], False, 3, "Hel"),  # spans three tokens, ends inside " wo"
        (["lo wo"], True, 3, "Hello wo"),
        (["d! S"], False, 6, "Hello worl"),
        (["STOP", "world"], False, 4, "Hello "),  # the earliest match wins
        (["P h"], True, 8, "Hello world! STOP h"),
        (["absent"], False, None, "Hello world! STOP here"),
    ],
)
def test_stop_strings_across_tokens(stop, include, matched_at, text):
    matcher = StopStringMatcher(ToyTokenizer(), stop, include_stop_str_in_output=include)
    assert _feed(matcher, SENTENCE) == matched_at
    assert matcher.text == text
    assert (matcher.matched is None) == (matched_at is None)


def test_match_is_sticky_and_special_tokens_follow_the_flag():
    matcher = StopStringMatcher(ToyTokenizer(), ["!"])
    assert matcher.update([0, 1, 4]) == "!"
    assert matcher.update([0, 1, 4, 2]) == "!" and matcher.text == "Hello"
    raw = StopStringMatcher(ToyTokenizer(), ["<eos>"], skip_special_tokens=False)
    assert raw.update([0, 8]) == "<eos>" and raw.text == "Hel"
    skipped = StopStringMatcher(ToyTokenizer(), ["<eos>"])
    assert skipped.update([0, 8]) is None
