"""Incremental detokenization with stop strings, for streaming.

Text is re-decoded from all output ids (a token can change how earlier bytes decode), and only
text that can no longer change is released: nothing that ends in an incomplete UTF-8 character,
and nothing that could still be the start of a stop string.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already released
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one token; return the newly released text. Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]  # the stop string itself is not returned
                self.stopped = True
                return self._release(len(self.text))
        # An incomplete character split over byte-fallback tokens decodes to one U+FFFD per byte
        # so far: hold back all of them, not only the last.
        safe = min(len(self.text) - self.hold, len(self.text.rstrip(INCOMPLETE)))
        return self._release(safe)

    def flush(self) -> str:
        """All text not yet released (at the end of the sequence)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
