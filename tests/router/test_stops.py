"""Stop strings over streamed text: exact cuts, hold-back, split-independence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.output.stops import StopMatcher


def run(stops, pieces, include=False) -> tuple[str, str | None]:
    m = StopMatcher(stops, include)
    out = ""
    for p in pieces:
        out += m.feed(p)
        if m.matched is not None:
            return out, m.matched
    return out + m.flush(), None


def reference(stops, text, include=False) -> tuple[str, str | None]:
    """The whole text at once: cut at the match that ends first (then starts first)."""
    spans = [(text.find(s) + len(s), text.find(s), s) for s in stops if s and s in text]
    if not spans:
        return text, None
    end, start, stop = min(spans)
    return text[: end if include else start], stop


def test_cut_exactly_before_the_stop():
    assert run(["END"], ["the ", "END", " more"]) == ("the ", "END")


def test_stop_split_across_pieces():
    m = StopMatcher(["END"])
    assert m.feed("the E") == "the "  # "E" held: it may begin "END"
    assert m.feed("N") == ""
    assert m.feed("D of") == ""
    assert m.matched == "END"


def test_include_stop_str_in_output():
    assert run(["END"], ["the E", "ND of"], include=True) == ("the END", "END")


def test_held_text_released_when_it_diverges():
    m = StopMatcher(["END"])
    assert m.feed("the EN") == "the "
    assert m.feed("TRY") == "ENTRY"
    assert m.matched is None


def test_flush_releases_a_held_prefix():
    assert run(["END"], ["the EN"]) == ("the EN", None)


def test_first_ending_match_wins():
    assert run(["bc", "abcd"], ["xabcd"]) == ("xa", "bc")
    assert run(["abc", "bc"], ["xabc"]) == ("x", "abc")  # same end: the earlier start


def test_empty_stop_is_ignored():
    assert run([""], ["abc"]) == ("abc", None)


def test_multibyte_stop():
    assert run(["你好"], ["Hello ", "你", "好 world"]) == ("Hello ", "你好")


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="abcE ND", max_size=30),
    stops=st.lists(st.text(alphabet="abcEND", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include=st.booleans(),
)
def test_any_split_matches_the_whole_text(text, stops, cuts, include):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert run(stops, pieces, include) == reference(stops, text, include)
