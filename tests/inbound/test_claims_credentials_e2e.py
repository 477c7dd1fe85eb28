"""Loose claims and misplaced credentials, through the real sidecar listener and the real `mcp` SDK app.

A NumericDate that is not a JSON number, an empty or non-string `sub`, and the caller's token
anywhere but the Authorization header (query string, another header, a cookie, the body) are refused.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrider.sidecar.dev import mcp_server
from outrider.sidecar.dev.idp import DevIdP
from outrider.sidecar.inbound.claims import MAX_NUMERIC_DATE, claim_problem, is_numeric_date
from outrider.sidecar.inbound.credentials import query_credential, token_elsewhere

from .conftest import RESOURCE, RecordingObserver, SidecarFactory
from .test_auth_e2e import CALL, HEADERS, INITIALIZE

NOW = int(time.time())


def _with_raw_payload(idp: DevIdP, payload_json: str) -> str:
    """Sign an exact JSON payload text with the IdP's key (for values json.dumps cannot make)."""
    base = idp.mint("alice", audience=RESOURCE)
    header_b64 = base.split(".")[0]
    payload_b64 = base64.urlsafe_b64encode(payload_json.encode()).rstrip(b"=").decode()
    signing_input = f"{header_b64}.{payload_b64}".encode()
    key = idp._key  # the dev IdP's own signing key: a token only the trusted issuer could mint
    algorithm = jwt.get_algorithm_by_name("ES256")
    signature = algorithm.sign(signing_input, key)
    return f"{header_b64}.{payload_b64}." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


async def _post(
    url: str, token: str | None, *, body: Any = CALL, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    sent = dict(HEADERS)
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(url, data=data, headers=sent) as response:
        text = await response.text()
        return response.status, dict(response.headers), json.loads(text) if text else None


CLAIM_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("exp_string", {"exp": str(NOW + 600)}, "'exp'"),
    ("exp_bool", {"exp": True}, "'exp'"),
    ("exp_huge", {"exp": 10**30}, "'exp'"),
    ("exp_negative", {"exp": -5}, "'exp'"),
    ("nbf_string", {"nbf": "0"}, "'nbf'"),
    ("iat_string", {"iat": str(NOW)}, "'iat'"),
    ("iat_list", {"iat": [NOW]}, "'iat'"),
    ("sub_empty", {"sub": ""}, "'sub'"),
    ("sub_blank", {"sub": "   "}, "'sub'"),
    ("sub_number", {"sub": 42}, "'sub'"),
]


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
@pytest.mark.parametrize(("case", "claims", "named"), CLAIM_CASES, ids=[c[0] for c in CLAIM_CASES])
async def test_claims_of_the_wrong_type_are_refused_naming_the_claim(
    case: str,
    claims: dict[str, Any],
    named: str,
    mcp_app: mcp_server.RunningServer,
    make_sidecar: SidecarFactory,
    idp: DevIdP,
) -> None:
    token = idp.mint("alice", audience=RESOURCE, extra=claims)
    observer = RecordingObserver()
    async with make_sidecar(mcp_app.port, observer=observer) as sidecar:
        status, headers, body = await _post(sidecar.mcp_url(), token)
    assert status == 401, (case, body)
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert named in headers["WWW-Authenticate"] and named in body["error"]["message"]
    assert token not in json.dumps(body)
    (call,) = observer.calls
    assert call.outcome["outcome"] == "denied"


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ('"exp": 1e400', "'exp'"),  # json.loads gives inf: int(inf) raised OverflowError inside PyJWT
        ('"exp": NaN', "'exp'"),
        ('"iat": Infinity', "'iat'"),
    ],
)
async def test_non_finite_numeric_dates_are_a_401_not_a_crash(
    payload: str, named: str, mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    base = {"iss": idp.issuer, "sub": "alice", "aud": RESOURCE, "exp": NOW + 600}
    text = json.dumps(base)[:-1] + ", " + payload + "}"
    if '"exp": 1e400' in payload or '"exp": NaN' in payload:
        text = text.replace(f'"exp": {NOW + 600}, ', "")
    token = _with_raw_payload(idp, text)
    async with make_sidecar(mcp_app.port) as sidecar:
        status, headers, body = await _post(sidecar.mcp_url(), token)
    assert status == 401, body
    assert named in headers["WWW-Authenticate"]


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
@pytest.mark.parametrize(("sub", "named"), [(None, "lacks the 'sub' claim"), ("null", "'sub' claim must be")])
async def test_a_missing_or_null_sub_is_refused_naming_it(
    sub: str | None, named: str, mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    body = f'{{"iss": "{idp.issuer}", "aud": "{RESOURCE}", "exp": {NOW + 600}'
    body += f', "sub": {sub}}}' if sub is not None else "}"
    token = _with_raw_payload(idp, body)
    async with make_sidecar(mcp_app.port) as sidecar:
        status, headers, _ = await _post(sidecar.mcp_url(), token)
    assert status == 401 and named in headers["WWW-Authenticate"]


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_a_well_formed_token_still_passes(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE, extra={"iat": NOW + 0.5, "nbf": float(NOW - 10)})
    async with make_sidecar(mcp_app.port) as sidecar:
        status, _, body = await _post(sidecar.mcp_url(), token, body=INITIALIZE)
    assert status == 200, body


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
@pytest.mark.parametrize(
    "query",
    [
        "access_token=abc",
        "ACCESS_TOKEN=abc",
        "x=1&token=abc",
        "id_token=abc",
        "api_key=abc",
        "apikey=abc",
        "client_secret=abc",
        "access%5Ftoken=abc",  # percent-encoded name
    ],
)
async def test_credentials_in_the_query_string_are_refused_with_400(
    query: str, mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    observer = RecordingObserver()
    async with make_sidecar(mcp_app.port, observer=observer) as sidecar:
        for bearer in (token, None):  # with or without a valid Authorization header
            status, headers, body = await _post(sidecar.mcp_url() + "?" + query, bearer)
            assert status == 400, (query, body)
            assert 'error="invalid_request"' in headers["WWW-Authenticate"]
            assert "query string" in body["error"]["message"]
            assert "abc" not in json.dumps(body)
    assert all(c.outcome["outcome"] == "denied" for c in observer.calls)


@pytest.mark.parametrize("mcp_app", ["json"], indirect=True)
async def test_the_callers_token_anywhere_else_is_refused(
    mcp_app: mcp_server.RunningServer, make_sidecar: SidecarFactory, idp: DevIdP
) -> None:
    token = idp.mint("alice", audience=RESOURCE)
    async with make_sidecar(mcp_app.port) as sidecar:
        url = sidecar.mcp_url()
        cases: list[tuple[str, dict[str, Any]]] = [
            ("cookie", {"headers": {"Cookie": f"session={token}"}}),
            ("other header", {"headers": {"X-Api-Key": token}}),
            ("path", {"url": url + "/" + token}),
            ("query value", {"url": url + "?q=" + token}),
            ("body", {"body": {**CALL, "params": {"name": "echo", "arguments": {"text": token}}}}),
        ]
        for name, case in cases:
            status, headers, body = await _post(
                case.get("url", url), token, body=case.get("body", CALL), headers=case.get("headers")
            )
            assert status == 400, (name, body)
            assert "only in the Authorization header" in body["error"]["message"], name
            assert token not in json.dumps(body) and token not in headers.get("WWW-Authenticate", "")
        # A legacy SSE POST's session_id and an ordinary cookie are not credentials: they pass.
        status, _, body = await _post(url, token, body=INITIALIZE, headers={"Cookie": "lb=abc"})
        assert status == 200, body


def test_the_legacy_session_id_parameter_is_not_a_credential_name() -> None:
    assert query_credential(["session_id"]) is None
    assert query_credential(["code", "state"]) is None
    assert query_credential(["Access_Token"]) == "access_token"


def test_token_elsewhere_finds_percent_encoded_copies() -> None:
    assert token_elsewhere("a.b-c", "/mcp?x=a%2Eb%2Dc", []) == "the request URL"
    assert token_elsewhere("a.b-c", "/mcp", [("Authorization", "Bearer a.b-c")]) is None
    assert token_elsewhere("a.b-c", "/mcp", [("Cookie", "x=a.b-c")]) == "the 'Cookie' header"


@given(
    st.one_of(
        st.text(), st.booleans(), st.none(), st.lists(st.integers()), st.dictionaries(st.text(), st.text())
    )
)
def test_only_json_numbers_are_numeric_dates(value: Any) -> None:
    assert not is_numeric_date(value)
    assert claim_problem({"sub": "a", "exp": value}) is not None


@given(st.one_of(st.integers(0, MAX_NUMERIC_DATE), st.floats(0, MAX_NUMERIC_DATE)))
def test_numbers_in_range_are_numeric_dates(value: float) -> None:
    assert is_numeric_date(value)
    assert claim_problem({"sub": "a", "exp": value, "iat": value, "nbf": value}) is None
