"""Incremental detokenization with the real SmolLM2 byte-level BPE tokenizer, on both paths."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from router.output.detokenizer import (
    REPLACEMENT,
    FastIncrementalDetokenizer,
    IncrementalDetokenizer,
    make_detokenizer,
)
from router.output.token_text import _BYTE_DECODER, TokenText

# Every behaviour test runs on DecodeStream and on the window fallback (forced: SmolLM2 is fast).
both = pytest.mark.parametrize(
    "impl", [FastIncrementalDetokenizer, IncrementalDetokenizer], ids=["fast", "fallback"]
)
MULTIBYTE = ["😀", "👩‍👩‍👧", "🇫🇷", "中文字符", " ñandú", "Ελ", "é", " the", "\n", "!"]


def stream(impl, tokenizer, ids, prompt=(), skip=True) -> list[str]:
    detok = impl(tokenizer, prompt, skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.fixture(scope="module")
def byte_id(tokenizer) -> dict[int, int]:
    """Byte -> the id of the byte-level token that is exactly that one byte (SmolLM2 lacks a
    few, such as 0xC0 and 0xF5-0xFF)."""
    vocab = tokenizer.get_vocab()
    return {b: vocab[c] for c, b in _BYTE_DECODER.items() if c in vocab}


@both
def test_emoji_split_over_tokens_comes_out_whole(impl, tokenizer):
    ids = tokenizer.encode("ok 😀!", add_special_tokens=False)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert len(ids) >= 4, pieces  # the emoji really is split: ' ðŁĺ' + 'Ģ'
    out = stream(impl, tokenizer, ids)
    assert all(REPLACEMENT not in p for p in out)
    assert "".join(out) == "ok 😀!"
    assert out[1:3] == ["", " 😀"]  # held back, then released whole by its last token


@both
def test_cjk_and_mixed_scripts(impl, tokenizer):
    text = "中文字符 日本語 한국어 ñandú Ελληνικά 🇫🇷 👩‍👩‍👧"
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = stream(impl, tokenizer, ids)
    assert "".join(out) == text
    assert all(REPLACEMENT not in p for p in out)


@both
def test_special_tokens_skipped_by_default(impl, tokenizer):
    ids = tokenizer.encode("hi", add_special_tokens=False) + [2]  # 2 = <|im_end|>
    assert "".join(stream(impl, tokenizer, ids)) == "hi"
    assert "".join(stream(impl, tokenizer, ids, skip=False)) == "hi<|im_end|>"


@both
def test_incomplete_character_at_the_end_is_flushed(impl, tokenizer):
    ids = tokenizer.encode(" 😀", add_special_tokens=False)[:-1]  # drop the last byte(s)
    detok = impl(tokenizer)
    assert [detok.push(i) for i in ids] == [""] * len(ids)
    assert detok.flush().endswith(REPLACEMENT)


@both
def test_prompt_context_is_not_emitted(impl, tokenizer):
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    ids = tokenizer.encode(" Paris.", add_special_tokens=False)
    assert "".join(stream(impl, tokenizer, ids, prompt)) == " Paris."


@both
def test_prompt_ending_mid_character_is_not_emitted(impl, tokenizer):
    # DecodeStream given such a context re-emits all of it with the first completed character.
    emoji = tokenizer.encode(" 😀", add_special_tokens=False)
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False) + emoji[:1]
    ids = emoji[1:] + tokenizer.encode(" Paris.", add_special_tokens=False)
    assert "".join(stream(impl, tokenizer, ids, prompt)) == tokenizer.decode(ids)


@both
def test_text_len_counts_emitted_characters(impl, tokenizer):
    detok = impl(tokenizer)
    for i in tokenizer.encode("a 你好 b", add_special_tokens=False):
        detok.push(i)
    detok.flush()
    assert detok.text_len == len("a 你好 b")


def mixed_ids(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Multi-byte characters, special tokens and arbitrary vocabulary ids, cut at n."""
    specials = sorted(tokenizer.added_tokens_decoder)  # SmolLM2: 17, all special
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.5:
            ids += tokenizer.encode(rng.choice(MULTIBYTE), add_special_tokens=False)
        elif r < 0.6:
            ids.append(rng.choice(specials))
        else:
            ids.append(rng.randrange(len(tokenizer)))
    return ids[:n]


@both
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_stream_equals_one_decode(impl, tokenizer, skip, seed):
    ids = mixed_ids(tokenizer, random.Random(seed), 300)
    prompt = tokenizer.encode("Reply in any language:", add_special_tokens=False)
    out = stream(impl, tokenizer, ids, prompt, skip)
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=skip)


@both
@pytest.mark.parametrize("seed", range(3))
def test_stray_bytes_between_characters_decode_as_one_decode(impl, tokenizer, byte_id, seed):
    # Continuation and lead bytes with no character to belong to, then real characters
    # split byte by byte: the window must commit the stray bytes without breaking the rest.
    rng = random.Random(seed)
    strays = [byte_id[b] for b in (0x80, 0x9F, 0xBF, 0xC3, 0xE2, 0xF0)]
    ids: list[int] = []
    while len(ids) < 300:
        if rng.random() < 0.5:
            ids += [rng.choice(strays) for _ in range(rng.randrange(1, 8))]
        else:
            char = rng.choice(["😀", "€", "ñ", "中", "a"])
            ids += [byte_id[b] for b in char.encode()]
    assert "".join(stream(impl, tokenizer, ids)) == tokenizer.decode(ids)


@both
def test_special_tokens_inside_a_character_are_skipped(impl, tokenizer, byte_id):
    # decode() joins the bytes around skipped special tokens, however many there are.
    im_start = 1
    ids = [byte_id[b] for b in "縝".encode()]
    ids = ids[:1] + [im_start] * 2 + ids[1:2] + [im_start] * 4 + ids[2:]
    assert "".join(stream(impl, tokenizer, ids)) == "縝"
    assert "".join(stream(impl, tokenizer, ids, skip=False)) == tokenizer.decode(ids)


class CountingTokenizer:
    """The tokenizer, with its decode() calls and the ids they decode counted."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.calls = 0
        self.ids = 0

    def decode(self, ids, **kwargs) -> str:
        self.calls += 1
        self.ids += len(ids)
        return self._tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("skip", [True, False])
def test_bytes_that_never_complete_cost_linear_work(tokenizer, byte_id, skip):
    n = 1000
    counting = CountingTokenizer(tokenizer)
    out = stream(IncrementalDetokenizer, counting, [byte_id[0x80]] * n, skip=skip)
    assert "".join(out) == REPLACEMENT * n
    # 3 decodes per token (prefix, full, committed head) of at most 3 context + 4 held ids;
    # unbounded, the window would decode ~n*n/2 = 500,000 ids.
    assert counting.calls <= 3 * n + 2
    assert counting.ids <= 3 * 7 * n


def test_skipped_special_tokens_cost_linear_work(tokenizer, byte_id):
    n = 1000
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("hi", add_special_tokens=False) + [2] * n + [byte_id[0x41]]
    assert "".join(stream(IncrementalDetokenizer, counting, ids)) == "hiA"
    assert counting.calls <= 2 * len(ids) + 2
    assert counting.ids <= 2 * 10 * len(ids)


def test_fast_path_never_holds_more_than_a_partial_character(tokenizer, byte_id):
    detok = FastIncrementalDetokenizer(tokenizer)
    stray = byte_id[0x80]
    for _ in range(1000):
        detok.push(stray)
        assert len(detok._window.ids) <= 5 + 4  # context + held; DecodeStream alone grows
    assert detok._stream is None  # the bounded window decodes the stray bytes meanwhile
    tail = tokenizer.encode(" ok 😀", add_special_tokens=False)
    assert "".join(detok.push(i) for i in tail) + detok.flush() == REPLACEMENT * 3 + " ok 😀"
    assert detok.text_len == 1000 + len(" ok 😀")


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Sentencepiece-style byte fallback: an invalid byte run turns all its bytes into U+FFFD,
    even ones decoded earlier ('A' below), which breaks DecodeStream's prefix."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)} | {"x": 256, "▁y": 257}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_fast_path_recovers_from_an_invalid_prefix():
    tokenizer = byte_fallback_tokenizer()
    ids = [0x41, 0x98, 257, 0xF0, 256, 0xAC, 0x9F, 0xAC, 256, 257]  # 'A', stray, ' y', ...
    out = stream(FastIncrementalDetokenizer, tokenizer, ids)
    assert "".join(out) == "".join(stream(IncrementalDetokenizer, tokenizer, ids))
    assert "".join(out).endswith("x y")


def test_factory_picks_decode_stream_for_fast_tokenizers(tokenizer):
    assert isinstance(make_detokenizer(tokenizer, [], True), FastIncrementalDetokenizer)
    slow = SimpleNamespace(decode=tokenizer.decode)  # no backend_tokenizer
    assert isinstance(make_detokenizer(slow, [], True), IncrementalDetokenizer)
    cleaning = copy.copy(tokenizer)  # decode() rewrites spaces: DecodeStream would not
    cleaning.clean_up_tokenization_spaces = True
    assert isinstance(make_detokenizer(cleaning, [], True), IncrementalDetokenizer)


def test_token_text_shows_partial_bytes_like_openai(served_model, tokenizer):
    tt = TokenText(tokenizer)
    ids = tokenizer.encode(" 😀", add_special_tokens=False)
    assert b"".join(tt.token_bytes(i) for i in ids) == " 😀".encode()
    assert tt.display(ids[0]).startswith("bytes:\\x")
    assert tt.display(2) == "<|im_end|>"
    assert served_model.token_text.display(tokenizer.encode("Hello")[0]) == "Hello"


@both
@settings(max_examples=120, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_any_text_round_trips(impl, tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    out = stream(impl, tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(out) == full
    # Some bytes are missing from SmolLM2's vocab, so a few texts decode to U+FFFD anyway.
    if REPLACEMENT not in full:
        assert all(REPLACEMENT not in p for p in out)
