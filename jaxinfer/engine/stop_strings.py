"""Stop strings over a growing output: detokenize, find the earliest match, truncate like vLLM.

A stop string may span several tokens (and a token may hold several characters of it), so the
check runs on text, not ids. Each call decodes the whole output again: simple and exact (a
tokenizer may rewrite earlier characters as more bytes arrive, e.g. a multi-byte character split
over tokens), and only requests with stop strings pay for it. Only the tail that could hold a new
match is searched: the text added since the last call plus the longest stop string's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StopStringMatcher:
    tokenizer: object  # anything with `decode(ids, skip_special_tokens=...)`
    stop: Sequence[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    _checked_chars: int = 0  # text before this offset holds no complete stop string
    text: str = ""  # the output text, truncated at the stop string once one matched
    matched: str | None = None

    def update(self, output_token_ids: Sequence[int]) -> str | None:
        """Decode the output so far; -> the stop string that ends it now, or None."""
        if self.matched is not None or not self.stop:
            return self.matched
        text = self.tokenizer.decode(
            list(output_token_ids), skip_special_tokens=self.skip_special_tokens
        )
        longest = max(len(s) for s in self.stop)
        search_from = max(0, min(self._checked_chars, len(text)) - longest + 1)
        hits = [(text.find(s, search_from), s) for s in self.stop]
        hits = [(at, s) for at, s in hits if at >= 0]
        self.text = text
        self._checked_chars = len(text)
        if not hits:
            return None
        at, stop = min(hits)  # the earliest match; on a tie, the first in sorted order
        self.text = text[: at + len(stop)] if self.include_stop_str_in_output else text[:at]
        self.matched = stop
        return stop
