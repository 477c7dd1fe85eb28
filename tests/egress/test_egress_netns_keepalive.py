"""Every request on a kept-alive plaintext HTTP connection is judged, in the real netns lab.

The internet's keep-alive server on allowed.test's address also serves shared.test (virtual hosts on
one IP; shared.test is not allowed). A hostile app (UID 1000, raw sockets) opens one connection to the
allowed address and switches Host after an allowed request, sequentially, pipelined, inside bodies
and framing tricks, through capture and through the explicit proxy. The internet's request log says
what really arrived.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import _require_netns
from .netlab import ALLOWED_V4, HERE, KEEPALIVE_PORT, POLICY, PYTHON, Lab, _run, lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

ALLOWED = f"allowed.test:{KEEPALIVE_PORT}"
SHARED = f"shared.test:{KEEPALIVE_PORT}"
# A bare name allows the web ports only; the keep-alive server listens on its own port.
KEEPALIVE_POLICY = {"allow": [*POLICY["allow"], ALLOWED]}


def get(host: str, path: str = "/", extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n"


def post(host: str, body: str, path: str = "/up") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n{body}"


def chunked(host: str, chunks: str, path: str = "/chunked") -> str:
    return f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}"


def talk(
    lab_: Lab, mode: str, requests: list[Any], ip: str = ALLOWED_V4, port: int = KEEPALIVE_PORT
) -> dict[str, Any]:
    argv = [PYTHON, str(HERE / "keepalive_client.py"), ip, str(port), mode, json.dumps(requests)]
    result = _run(*lab_.in_pod(*argv, uid=1000, env={"PYTHONDONTWRITEBYTECODE": "1"}), timeout=60)
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def served(lab_: Lab, marker: str) -> list[dict[str, Any]]:
    """Requests the internet served whose path carries `marker` (each test uses its own)."""
    return [h for h in lab_.hits(kind="http-request") if marker in h["target"]]


@pytest.fixture(scope="module")
def capture() -> Iterator[Lab]:
    _require_netns()
    config = {
        "egress": {"mode": "capture", "policy": KEEPALIVE_POLICY, "policy_file": None, "hello_timeout_s": 1.0}
    }
    with lab(capture=True, sidecar_config=config) as current:
        yield current


@pytest.fixture(scope="module")
def explicit() -> Iterator[Lab]:
    _require_netns()
    config = {
        "egress": {"mode": "explicit", "policy": KEEPALIVE_POLICY, "policy_file": None, "dns_cache_s": 0}
    }
    with lab(capture=False, sidecar_config=config) as current:
        yield current


def test_shared_name_is_denied_on_its_own(capture: Lab) -> None:
    answer = talk(capture, "sequential", [get(SHARED, "/alone-1")])
    assert [a["status"] for a in answer["answers"]] == [403] and answer["closed"]
    assert served(capture, "/alone-1") == []


def test_keep_alive_switch_to_a_denied_host_is_refused_and_closed(capture: Lab) -> None:
    answer = talk(
        capture,
        "sequential",
        [get(ALLOWED, "/seq-1"), get(ALLOWED, "/seq-2"), get(SHARED, "/seq-3"), get(ALLOWED, "/seq-4")],
    )
    assert [a["status"] for a in answer["answers"]] == [200, 200, 403], answer
    assert "shared.test" in answer["answers"][2]["body"] and answer["closed"]
    hits = served(capture, "/seq-")
    assert [h["target"] for h in hits] == ["/seq-1", "/seq-2"]
    assert len({h["peer_port"] for h in hits}) == 1  # one upstream connection: keep-alive was used
    assert all(h["host"] == ALLOWED for h in hits)


def test_pipelined_switch_is_answered_in_order_after_the_allowed_answers(capture: Lab) -> None:
    answer = talk(
        capture,
        "pipelined",
        [
            get(ALLOWED, "/pipe-1"),
            post(ALLOWED, "x" * 100, "/pipe-2"),
            get(SHARED, "/pipe-3"),
            get(ALLOWED, "/pipe-4"),
        ],
    )
    assert [a["status"] for a in answer["answers"]] == [200, 200, 403], answer
    assert json.loads(answer["answers"][1]["body"])["target"] == "/pipe-2"
    assert [h["target"] for h in served(capture, "/pipe-")] == ["/pipe-1", "/pipe-2"]


def test_request_bodies_are_framed_so_a_hidden_request_is_body_and_a_real_one_is_judged(capture: Lab) -> None:
    hidden = get(SHARED, "/body-hidden")
    answer = talk(
        capture,
        "sequential",
        [
            post(ALLOWED, hidden, "/body-1"),  # a request inside a Content-Length body is just body
            chunked(
                ALLOWED,
                f"5;ext=1\r\nhello\r\n{len(hidden):x}\r\n{hidden}\r\n0\r\nX-Trailer: t\r\n\r\n",
                "/body-2",
            ),
            [
                f"POST /body-3 HTTP/1.1\r\nHost: {ALLOWED}\r\nContent-Length: 5\r\n"
                "Expect: 100-continue\r\n\r\n",
                "abcde",
            ],
            get(SHARED, "/body-4"),
        ],
    )
    assert [a["status"] for a in answer["answers"]] == [200, 200, 200, 403], answer
    hits = served(capture, "/body-")
    assert [h["target"] for h in hits] == ["/body-1", "/body-2", "/body-3"]
    assert hits[0]["body"] == hidden and hits[1]["body"] == "hello" + hidden and hits[2]["body"] == "abcde"
    assert served(capture, "/body-hidden") == [] and all(h["host"] == ALLOWED for h in hits)


def test_large_bodies_move_by_splice_and_the_next_request_is_still_judged(capture: Lab) -> None:
    big_chunk = f"{200_000:x}\r\n<<BIG:200000>>\r\n5\r\nhello\r\n0\r\n\r\n"
    answer = talk(
        capture,
        "pipelined",
        [
            f"POST /big-1 HTTP/1.1\r\nHost: {ALLOWED}\r\nContent-Length: 300000\r\n\r\n<<BIG:300000>>",
            chunked(ALLOWED, big_chunk, "/big-2"),
            get(SHARED, "/big-3"),
        ],
    )
    assert [a["status"] for a in answer["answers"]] == [200, 200, 403], answer
    hits = served(capture, "/big-")
    assert [(h["target"], h["body"]) for h in hits] == [
        ("/big-1", "<300000 bytes>"),
        ("/big-2", "<200005 bytes>"),
    ]


@pytest.mark.parametrize(
    ("name", "smuggle"),
    [
        (
            "cl_te",
            f"POST /smug-cl_te HTTP/1.1\r\nHost: {ALLOWED}\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
            f"0\r\n\r\n{get(SHARED, '/smug-cl_te-x')}",
        ),
        (
            "two_lengths",
            f"POST /smug-two_lengths HTTP/1.1\r\nHost: {ALLOWED}\r\nContent-Length: 0\r\n"
            "Content-Length: 40\r\n\r\n"
            f"{get(SHARED, '/smug-two_lengths-x')}",
        ),
        (
            "te_obfuscated",
            f"POST /smug-te_obfuscated HTTP/1.1\r\nHost: {ALLOWED}\r\n"
            "Transfer-Encoding: chunked, identity\r\n\r\n"
            f"0\r\n\r\n{get(SHARED, '/smug-te_obfuscated-x')}",
        ),
        ("bare_lf", f"GET /smug-bare_lf HTTP/1.1\nHost: {ALLOWED}\r\n\r\n{get(SHARED, '/smug-bare_lf-x')}"),
    ],
)
def test_ambiguous_framing_is_refused_before_anything_is_sent(capture: Lab, name: str, smuggle: str) -> None:
    answer = talk(capture, "pipelined", [get(ALLOWED, f"/smug-{name}-first"), smuggle])
    statuses = [a["status"] for a in answer["answers"]]
    assert statuses in ([200, 400], [400]), answer  # bare LF in the first head: refused at once
    assert [h["target"] for h in served(capture, f"/smug-{name}")] in ([f"/smug-{name}-first"], [])
    assert served(capture, f"/smug-{name}-x") == []


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_protocol_upgrades_on_plaintext_http_are_refused(capture: Lab, upgrade: str) -> None:
    extra = f"Connection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    answer = talk(
        capture, "sequential", [get(ALLOWED, f"/up-{upgrade}-1"), get(ALLOWED, f"/up-{upgrade}-2", extra)]
    )
    assert [a["status"] for a in answer["answers"]] == [200, 403], answer
    assert "upgrade" in answer["answers"][1]["body"]
    assert [h["target"] for h in served(capture, f"/up-{upgrade}")] == [f"/up-{upgrade}-1"]


@pytest.mark.parametrize(
    "host",
    [
        f"{ALLOWED_V4}:{KEEPALIVE_PORT}",  # the allowed name's own address: an IP literal needs a CIDR rule
        f"shared..test:{KEEPALIVE_PORT}",
        f"shared.test%00:{KEEPALIVE_PORT}",
        # An ideographic full stop (UTS #46 maps it to "."), as UTF-8 on the wire.
        "shared.test\u3002".encode().decode("latin-1") + f":{KEEPALIVE_PORT}",
    ],
)
def test_a_host_the_policy_cannot_judge_by_name_is_refused_not_forwarded(capture: Lab, host: str) -> None:
    """After an allowed request, a Host that is an IP literal or no host name at all was forwarded
    unjudged (the connection's own address stood in for it): the shared front end served it."""
    marker = f"/unjudged-{zlib.crc32(host.encode('latin-1'))}"
    answer = talk(capture, "sequential", [get(ALLOWED, marker + "-1"), get(host, marker + "-2")])
    assert [a["status"] for a in answer["answers"]] == [200, 403], answer
    assert [h["target"] for h in served(capture, marker)] == [marker + "-1"]


def test_the_refusal_is_audited(capture: Lab) -> None:
    before = len(capture.decisions(name="shared.test", allowed=False))
    talk(capture, "sequential", [get(ALLOWED, "/audit-1"), get(SHARED, "/audit-2")])
    deadline = time.monotonic() + 5
    while len(capture.decisions(name="shared.test", allowed=False)) == before:
        assert time.monotonic() < deadline, "the refused keep-alive request was not audited"
        time.sleep(0.02)
    decision = capture.decisions(name="shared.test", allowed=False)[-1]
    assert decision["destination_port"] == KEEPALIVE_PORT and decision["protocol"] == "http"


# -- explicit proxy ------------------------------------------------------------------------------------


def proxied(host: str, path: str, extra: str = "") -> str:
    return f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n"


def test_explicit_proxy_judges_every_absolute_uri_on_a_kept_alive_connection(explicit: Lab) -> None:
    answer = talk(
        explicit,
        "sequential",
        [
            proxied(ALLOWED, "/px-1"),
            proxied(ALLOWED, "/px-2"),
            proxied(SHARED, "/px-3"),
            proxied(ALLOWED, "/px-4"),
        ],
        ip="127.0.0.1",
        port=15001,
    )
    assert [a["status"] for a in answer["answers"]] == [200, 200, 403], answer
    assert answer["closed"]
    hits = served(explicit, "/px-")
    assert [h["target"] for h in hits] == ["/px-1", "/px-2"] and len({h["peer_port"] for h in hits}) == 1


def test_explicit_proxy_pipelined_switch_is_refused(explicit: Lab) -> None:
    answer = talk(
        explicit,
        "pipelined",
        [proxied(ALLOWED, "/pp-1"), proxied(SHARED, "/pp-2")],
        ip="127.0.0.1",
        port=15001,
    )
    assert [a["status"] for a in answer["answers"]] == [200, 403], answer
    assert [h["target"] for h in served(explicit, "/pp-")] == ["/pp-1"]


def test_explicit_proxy_host_header_never_overrides_the_judged_uri(explicit: Lab) -> None:
    request = f"GET http://{ALLOWED}/hh-1 HTTP/1.1\r\nHost: {SHARED}\r\n\r\n"
    answer = talk(explicit, "sequential", [request], ip="127.0.0.1", port=15001)
    assert [a["status"] for a in answer["answers"]] == [200], answer
    (hit,) = served(explicit, "/hh-1")
    assert hit["host"] == ALLOWED  # the origin saw the judged authority, not the client's Host
