"""Incremental detokenization with stop strings: text deltas that never split a UTF-8 character and never
show any part of a stop string."""

from __future__ import annotations

from tokenizers import Tokenizer

CONTEXT = 6  # tokens decoded before the new ones, so byte-level merges and spaces come out right


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tok, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (complete characters)
        self.sent = 0  # characters of `text` already emitted
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of `text`
        self._read = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the text that may be emitted now ("" if held back)."""
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        new_text = self.tok.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._read = len(self.ids)
            self._prefix = max(self._read - CONTEXT, 0)
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        for s in self.stop:
            i = self.text.find(s, max(self.sent - len(s) + 1, 0))
            if i >= 0 and i < end:
                end = i
                self.stopped = True
        if self.stopped:
            self.text = self.text[:end]
        elif not final:  # hold back a tail that may still become a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def flush(self) -> str:
        """The held-back tail at the end of the sequence."""
        return self._emit(final=True)
