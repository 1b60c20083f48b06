"""Incremental response text: stop strings cut it, and streamed deltas never echo them."""

from __future__ import annotations

from typing import Callable, Sequence


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one occurred."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextStream:
    """Turns committed token ids into text deltas that are safe to show.

    A delta is emitted only when it cannot be the start of a stop string and does not end in an
    incomplete UTF-8 character; :meth:`close` flushes what is left.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], emit: Callable[[str], None] | None) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.emit = emit
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, ids: Sequence[int]) -> None:
        """Add committed tokens and emit what became safe."""
        if self.stopped or not ids:
            return
        self.ids.extend(int(i) for i in ids)
        text, self.stopped = cut_at_stop(self.decode(self.ids), self.stop)
        if not self.stopped:
            if text.endswith("\ufffd"):  # an unfinished multi-byte character
                return
            text = text[: len(text) - _held_back(text, self.stop)]
        self._send(text)

    def close(self) -> str:
        """Flush and return the final text."""
        text, self.stopped = cut_at_stop(self.decode(self.ids), self.stop)
        self._send(text)
        return text

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            if self.emit is not None:
                self.emit(text[self.sent :])
            self.sent = len(text)
