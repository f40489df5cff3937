"""Generated tokens -> text pieces for streaming, cut at stop strings.

A piece is released only when it can no longer change: text that might be the start of a
stop string, or a byte sequence not yet a whole UTF-8 character (decoded as U+FFFD), waits
for the next token. Once a stop string appears, the text ends before it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes an incomplete UTF-8 sequence to


class TextStream:
    def __init__(self, decode, stop: tuple[str, ...] = ()):
        """decode(token_ids) -> str; stop: strings that end the text (not included in it)."""
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {list(stop)!r}")
        self.decode, self.stop = decode, tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # the text so far, cut at a stop string once one is found
        self.stopped = False
        self._released = 0  # characters of self.text handed out as pieces

    def push(self, token: int) -> str:
        """Add one token; returns the text that became final (may be "")."""
        if self.stopped:
            raise ValueError("push after a stop string ended the text")
        self.tokens.append(int(token))
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        return self._release(len(text) - self._pending_tail(text))

    def finish(self) -> str:
        """The text held back so far (the sequence ended without completing a stop string)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self._released:upto] if upto > self._released else ""
        self._released = max(self._released, upto)
        return piece

    def _pending_tail(self, text: str) -> int:
        """Length of the end of text that may still change: a partial UTF-8 character or a
        proper prefix of a stop string."""
        tail = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    tail = max(tail, n)
                    break
        return tail
