"""Stop strings over streamed text: cut exactly at the match, and hold back possible starts.

Text arrives in pieces (one per token), and a stop string can straddle pieces:

    stop = "END"    pieces: "the E" | "ND of"
    feed("the E") -> releases "the ", holds "E"   (it could begin "END")
    feed("ND of") -> match at "END": releases "" (or "END" with include_stop), done

Only the longest suffix of the unreleased text that is a prefix of some stop string is held,
so the output is the same however the text is split. Among matches, the one that ends first
wins (ties: the one that starts first), which is what a token-by-token stream would see.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        self._stops = [s for s in stops if s]  # "" would match everywhere: treated as absent
        self._include = include_stop
        self._held = ""
        self.matched: str | None = None

    def _first_match(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the match that ends first, then starts first."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            span = (start, start + len(stop))
            if best is None or (span[1], span[0]) < (best[1], best[0]):
                best = span
        return best

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, piece: str) -> str:
        """Text safe to release now. After a match, `matched` is set and the choice is over."""
        assert self.matched is None, "feed after a stop string matched"
        if not self._stops:
            return piece
        text = self._held + piece
        span = self._first_match(text)
        if span is not None:
            start, end = span
            self.matched = text[start:end]
            self._held = ""
            return text[:end] if self._include else text[:start]
        hold = self._hold_len(text)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]

    def flush(self) -> str:
        """The generation ended without a match: the held text was never a stop after all."""
        held, self._held = self._held, ""
        return held
