"""Streaming text pieces: held back while they could still change, cut at stop strings."""
from __future__ import annotations

import pytest

from memory3.model import Memory3Tokenizer
from memory3.text_stream import TextStream


@pytest.fixture(scope="module")
def tok():
    return Memory3Tokenizer.byte_level()


def feed(stream, tok, text):
    return [stream.push(t) for t in tok.encode(text)]


def test_pieces_without_stop_strings_are_each_character(tok):
    s = TextStream(tok.decode)
    assert feed(s, tok, "abc") == ["a", "b", "c"] and s.finish() == "" and s.text == "abc"


def test_a_partial_stop_string_waits_then_is_released(tok):
    s = TextStream(tok.decode, ("END",))
    assert feed(s, tok, "xEN") == ["x", "", ""]
    assert s.push(tok.encode("d")[0]) == "ENd"  # not a stop string after all
    assert feed(s, tok, "yEND") == ["y", "", "", ""] and s.stopped and s.text == "xENdy"
    with pytest.raises(ValueError, match="push after a stop string"):
        s.push(5)


def test_held_back_text_is_flushed_at_the_end(tok):
    s = TextStream(tok.decode, ("\n\n",))
    assert feed(s, tok, "ok\n") == ["o", "k", ""]
    assert s.finish() == "\n" and s.text == "ok\n"


def test_a_multibyte_character_is_released_whole(tok):
    s = TextStream(tok.decode)
    pieces = feed(s, tok, "é€")  # 2 + 3 bytes, one token each
    assert pieces == ["", "é", "", "", "€"] and "".join(pieces) == s.text


def test_the_earliest_stop_string_wins(tok):
    s = TextStream(tok.decode, ("cd", "bcd"))  # both complete with "d"; "bcd" starts first
    assert feed(s, tok, "abcd") == ["a", "", "", ""] and s.stopped and s.text == "a"


def test_bad_stop_strings():
    with pytest.raises(ValueError, match="stop must be non-empty strings"):
        TextStream(str, ("",))
