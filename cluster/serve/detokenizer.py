"""Incremental detokenization with stop strings, for streaming, in time linear in the output.

Each token decodes a short window of ids, not the whole output: the window starts a few tokens
back (at `prefix`) so that decoding starts where the text already settled, and the new text is
what the window decodes to past what its settled part (`prefix:read`) decodes to. Both decodes
start at the same token, so the tokenizer's handling of a leading space cancels out. Text that can
still change is held back: bytes of a character split over byte-fallback tokens (each decodes to
U+FFFD until the character is whole), and anything that could still be the start of a stop string.
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
        self.prefix = 0  # the window's first id
        self.read = 0  # ids before this are in `text`
        self.text = ""  # the settled text so far
        self.emitted = 0  # characters of the text already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one token; return the newly released text. Sets `stopped` at a stop string."""
        self.ids.append(token_id)
        new = self._window_text(complete_only=True)
        if new:
            self.text += new
        if self.stop:
            search_from = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]  # the stop string itself is not returned
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def flush(self) -> str:
        """All text not yet released (at the end of the sequence), incomplete characters included."""
        if not self.stopped:
            self.text += self._window_text(complete_only=False)
        return self._release(len(self.text))

    def _window_text(self, *, complete_only: bool) -> str:
        """What the unsettled ids add to the text; settles them unless it ends mid-character."""
        settled = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(window) <= len(settled) or (complete_only and window.endswith(INCOMPLETE)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(settled) :]

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
