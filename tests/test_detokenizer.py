"""Streaming detokenization with the real Mixtral tokenizer: released text, multi-byte characters, stop strings."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.serve.detokenizer import Detokenizer
from mixtral.tokenizer import load_tokenizer, write_mixtral_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("tokenizer")
    write_mixtral_tokenizer(out)
    return load_tokenizer(out)


def stream(detok: Detokenizer, ids: list[int]) -> list[str]:
    """Every piece released while adding ids one by one, then the flush."""
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize(
    "text,byte_tokens",
    [
        ("Hello world, this is a test.", 0),
        ("日本語のテキスト 🙂 café", 0),  # multi-byte characters that have their own tokens
        ("   three leading spaces", 0),
        ("a  b\n  indented", 1),  # the newline is a byte-fallback token
        pytest.param("Ĉ and Ŋ", 4, id="2-byte characters over byte-fallback tokens"),
        pytest.param("ꙮ x", 3, id="a 3-byte character"),
        pytest.param("🦜 parrot", 4, id="a 4-byte emoji"),
        pytest.param("鬱蒼 forest", 6, id="3-byte characters in a row"),
    ],
)
def test_released_text_is_the_decoded_text_without_broken_characters(tokenizer: Any, text: str, byte_tokens: int) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    # The multi-byte cases mean something only where the tokenizer splits a character over byte tokens.
    assert sum(p.startswith("<0x") for p in tokenizer.convert_ids_to_tokens(ids)) == byte_tokens
    pieces = stream(Detokenizer(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces)


def test_text_stops_right_before_a_stop_string_spanning_two_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world. STOP here, then more.", add_special_tokens=False)
    assert "STOP" not in tokenizer.convert_ids_to_tokens(ids)  # "▁ST" + "OP"
    detok = Detokenizer(tokenizer, stop=("STOP", "then"))
    released = ""
    for i in ids:
        assert not detok.stopped
        released += detok.add(i)
        if detok.stopped:
            break
    assert detok.stopped and released == "Hello world. "
    assert detok.flush() == ""


def test_a_possible_start_of_a_stop_string_is_held_back_until_it_cannot_be_one(tokenizer: Any) -> None:
    stop = ("world!", "d.")
    text = "Hello world, wide world? Done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=stop)
    released = ""
    for n, i in enumerate(ids, 1):
        released += detok.add(i)
        so_far = tokenizer.decode(ids[:n])
        assert so_far.startswith(released)
        # No stop string may begin in released text that the next tokens could still complete.
        assert not any(s.startswith(so_far[k:]) for s in stop for k in range(len(released)))
        if so_far == "Hello world":
            assert "w" not in released
    assert not detok.stopped
    assert released.startswith("Hello world, wide world")  # released by later tokens
    assert released + detok.flush() == text


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.lengths = tokenizer, []  # type: ignore[var-annotated]

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.lengths.append(len(ids))
        return str(self.tokenizer.decode(ids, **kwargs))


def test_each_token_decodes_a_short_window_not_the_whole_output(tokenizer: Any) -> None:
    text = "The experts of a mixture take turns, 🦜 and ꙮ too. " * 40
    ids = tokenizer.encode(text, add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    pieces = stream(Detokenizer(counting, ("never appears",)), ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) > 500 and max(counting.lengths) <= 8  # linear in the output, not quadratic
