"""`token_in_body` searches with `bytes.find`: the same answers as the `in` operator it replaced."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from outrider.sidecar.inbound.credentials import token_in_body

TOKENS = st.text(alphabet=st.characters(max_codepoint=127), max_size=12)


@given(token=TOKENS, body=st.binary(max_size=64), before=st.binary(max_size=8), after=st.binary(max_size=8))
def test_same_answer_as_in(token: str, body: bytes, before: bytes, after: bytes) -> None:
    for data in (body, before + token.encode("ascii") + after):
        assert token_in_body(token, data) == (bool(data) and token.encode("ascii") in data)


def test_found_and_not_found() -> None:
    assert token_in_body("abc", b'{"t": "xabcx"}') is True
    assert token_in_body("abc", b'{"t": "ab"}') is False
    assert token_in_body("", b"") is False
    assert token_in_body("", b"x") is True
