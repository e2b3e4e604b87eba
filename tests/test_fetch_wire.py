"""The fetch wire format: round trips, and every malformed frame refused with a named reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from device_agent.errors import ProtocolError
from device_agent.fetch.wire import (
    MAX_CHUNK_BYTES,
    FetchRequest,
    FetchResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    validate_path,
)


def test_request_round_trip() -> None:
    request = FetchRequest("a1b2", "targets/m/3/litert/abc.model.tflite", 65536, 65536)
    assert decode_request(encode_request(request)) == request


def test_response_round_trip_keeps_bytes_verbatim() -> None:
    data = bytes(range(256)) * 4 + b"\n\n{"  # newlines and braces in the body are data
    header = FetchResponse("a1b2", "metadata/1.root.json", 1024, total=4096)
    decoded, body = decode_response(encode_response(header, data))
    assert decoded == header
    assert body == data


def test_error_response_has_no_bytes() -> None:
    header = FetchResponse("a1b2", "metadata/9.root.json", 0, status="not_found", error="no file")
    decoded, body = decode_response(encode_response(header))
    assert (decoded.status, decoded.error, body) == ("not_found", "no file", b"")
    with pytest.raises(ProtocolError, match="carries no bytes"):
        encode_response(header, b"x")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "non-empty"),
        ("../etc/passwd", "must start with"),
        ("/metadata/root.json", "must start with"),
        ("metadata", "must start with"),
        ("metadata/../keys/online/targets.pem", "'..'"),
        ("targets/a//b", "''"),
        ("targets/a/./b", "'.'"),
        ("targets/a b", "'a b'"),
        ("metadata/" + "x" * 600, "at most 512"),
    ],
)
def test_paths_outside_the_repository_are_refused(path: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        validate_path(path)


def _request(**fields: object) -> bytes:
    base: dict[str, object] = {
        "schema": 1,
        "type": "fetch_req",
        "req_id": "r1",
        "path": "metadata/timestamp.json",
        "offset": 0,
        "length": 100,
    }
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 2000 + b"]" * 2000, "not valid UTF-8 JSON"),  # nesting past the recursion limit
        (_request(schema=2), "schema 2"),
        (_request(type="fetch_res"), "expected 'fetch_req'"),
        (_request(offset=-1), "negative"),
        (_request(offset=True), "'offset' must be an integer"),
        (_request(length=0), "outside 1.."),
        (_request(length=MAX_CHUNK_BYTES + 1), "outside 1.."),
        (_request(req_id="a/b"), "id 'a/b' is malformed"),
        (_request(path="keys/online/timestamp.pem"), "must start with"),
        (_request(path=None), "'path' must be a string"),
        (b"{" + b" " * 5000 + b"}", "exceeds"),
    ],
)
def test_malformed_requests_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_request(payload)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"schema":1}', "no header line"),
        (b"[" * 2000 + b"]" * 2000 + b"\n", "not valid UTF-8 JSON"),  # nesting past the limit
        (b"not json\nabc", "not valid UTF-8 JSON"),
        (b'{"schema":1,"type":"fetch_req"}\n', "expected 'fetch_res'"),
        (
            b'{"schema":1,"type":"fetch_res","req_id":"r","path":"metadata/x","offset":0,'
            b'"status":"ok"}\nabc',
            "total size",
        ),
        (
            b'{"schema":1,"type":"fetch_res","req_id":"r","path":"metadata/x","offset":0,'
            b'"status":"weird","total":3}\n',
            "status 'weird'",
        ),
        (
            b'{"schema":1,"type":"fetch_res","req_id":"r","path":"metadata/x","offset":0,'
            b'"status":"error","error":"x"}\nabc',
            "carries 3 bytes",
        ),
        (
            b'{"schema":1,"type":"fetch_res","req_id":"r","path":"metadata/x","offset":0,'
            b'"status":"ok","total":"3"}\nabc',
            "'total' must be an integer",
        ),
    ],
)
def test_malformed_responses_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode_response(payload)


def test_oversized_response_body_is_refused() -> None:
    header = FetchResponse("r", "targets/x", 0, total=MAX_CHUNK_BYTES + 1)
    with pytest.raises(ProtocolError, match="at most"):
        encode_response(header, b"x" * (MAX_CHUNK_BYTES + 1))
    frame = encode_response(header, b"") + b"x" * (MAX_CHUNK_BYTES + 1)
    with pytest.raises(ProtocolError, match="at most"):
        decode_response(frame)


def _run_with_failpoints(spec: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEOPS_AGENT_FAILPOINTS": spec}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_an_armed_failpoint_kills_the_process_where_it_stands() -> None:
    code = (
        "from device_agent import failpoints\n"
        "print('before', flush=True)\n"
        "failpoints.check('updater.enter:installing')\n"
        "print('after', flush=True)\n"
    )
    killed = _run_with_failpoints("updater.enter:installing=kill", code)
    assert killed.returncode == -9
    assert killed.stdout == "before\n"
    other = _run_with_failpoints("updater.enter:testing=kill", code)
    assert (other.returncode, other.stdout) == (0, "before\nafter\n")


def test_a_byte_failpoint_fires_once_enough_bytes_arrived() -> None:
    code = (
        "from device_agent import failpoints\n"
        "for n in (1000, 4000, 5000, 6000):\n"
        "    failpoints.check_bytes(n)\n"
        "    print(n, flush=True)\n"
    )
    killed = _run_with_failpoints("fetch.bytes:5000=kill", code)
    assert killed.returncode == -9
    assert killed.stdout.split() == ["1000", "4000"]


def test_a_malformed_failpoint_spec_is_refused() -> None:
    result = _run_with_failpoints("updater.enter:idle=explode", "import device_agent.failpoints")
    assert result.returncode == 1
    assert "the only action is 'kill'" in result.stderr
