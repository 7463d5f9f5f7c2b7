"""Text of a growing token sequence, released as soon as it can no longer change.

Two things hold text back: a partial UTF-8 character at the end (a byte-level token shows as
U+FFFD until its character completes), and a tail that could still grow into a stop string.
A found stop string ends the text before it, so streamed deltas always add up to the final
text (the OpenAI API's behaviour: the stop string is not returned).
"""

from __future__ import annotations


class Detokenizer:
    """add(token) -> (new text, a stop string was found); flush() -> the held-back rest."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters released
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        if self.tokenizer is None or self.stopped:
            return "", self.stopped
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = self._stop_at()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._release(len(self.text)), True
        safe = len(self.text.rstrip("\ufffd"))
        safe -= self._partial_stop(self.text[:safe])
        return self._release(safe), False

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def _stop_at(self) -> int | None:
        # A stop string can only begin after what was released (held-back text covers it).
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
