"""Input sources: files, stdin, HTTP on localhost, a local MQTT topic, the synthetic sensor.

Bad input never stops a source: it is counted by kind and, where someone waits, answered with
``{"error": ...}``. The daemon side is played by a small thread that answers every sample.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from device_agent.link import Message, MqttEndpoint, MqttLink
from device_agent.sources import (
    BadSampleError,
    FileSource,
    HttpSource,
    LocalMqttSource,
    Sample,
    Source,
    SourceConfig,
    SourceError,
    StdinSource,
    SyntheticSource,
    open_source,
    parse_line,
    parse_sample,
    reply_document,
)
from tests.fixtures.mqtt import next_message, wait_subscribed

SHAPE = (2, 3)


def answer_all(source: Source, answer: Callable[[Sample], dict[str, Any]]) -> threading.Thread:
    """Play the daemon: answer every sample of ``source`` until it is closed."""

    def run() -> None:
        for sample in source.samples():
            if sample.reply is not None:
                sample.reply(answer(sample))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def sum_answer(sample: Sample) -> dict[str, Any]:
    return {"label": int(sample.raw.sum()), "confidence": 1.0, "probabilities": [1.0]}


# -- one sample --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["1,2,3,4,5,6", "1 2 3 4 5 6", " 1, 2 ,3 4,5,6 ", "[1,2,3,4,5,6]", "[[1,2,3],[4,5,6]]"],
)
def test_a_line_of_numbers_or_a_json_array_is_one_sample(line: str) -> None:
    raw = parse_line(line, SHAPE)
    assert raw.dtype == np.float32
    assert raw.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("line", "kind", "words"),
    [
        ("1,2,x,4,5,6", "parse", "'x' is not a number"),
        ("[1,2,", "parse", "not a valid JSON array"),
        ("[" * 50_000 + "]" * 50_000, "parse", "not a valid JSON array"),  # too deep to parse
        ("1,2,3,4,5", "shape", "expected shape [2, 3] (6 values), got shape [5] (5 values)"),
        ("[[1,2],[3,4],[5,6]]", "shape", "expected shape [2, 3]"),
        ("[[1,2,3],[4,5]]", "shape", "ragged"),
        ("1,2,nan,4,5,6", "nonfinite", "1 value(s) are NaN or infinite"),
        ("1,2,inf,4,5,1e39", "nonfinite", "2 value(s)"),  # 1e39 overflows float32
        ('[1,2,3,4,5,"6"]', "dtype", "expected numbers, got string"),
        ("[true,2,3,4,5,6]", "dtype", "expected numbers"),
        ("[1,2,3,4,5,null]", "dtype", "null"),
    ],
)
def test_a_bad_line_names_the_problem(line: str, kind: str, words: str) -> None:
    with pytest.raises(BadSampleError) as err:
        parse_line(line, SHAPE)
    assert err.value.kind == kind
    assert words in str(err.value)


def test_json_values_other_than_an_array_are_refused() -> None:
    with pytest.raises(BadSampleError, match="expected an array of numbers, got object"):
        parse_sample({"a": 1}, SHAPE)


def test_reply_document_is_plain_json() -> None:
    class Prediction:
        label = np.int64(2)
        confidence = np.float32(0.75)
        probabilities = np.array([0.125, 0.125, 0.75], dtype=np.float32)

    document = reply_document(Prediction(), "m-1")
    assert document == {
        "label": 2,
        "confidence": 0.75,
        "probabilities": [0.125, 0.125, 0.75],
        "model_id": "m-1",
    }
    json.dumps(document)


# -- file --------------------------------------------------------------------------------------


def test_csv_replay_counts_bad_rows_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text(
        "a,b,c,label,d,e,f\n"
        "1,2,3,0,4,5,6\n"
        "\n"
        "1,2,x,1,4,5,6\n"  # unparsable
        "1,2,3,1,4,5\n"  # one value short
        "1,2,nan,1,4,5,6\n"  # NaN
        "1,2,3,1.5,4,5,6\n"  # fractional label
        "6,5,4,3,3,2,1\n"
    )
    source = FileSource(path, SHAPE, label_column="label")
    samples = list(source)
    assert [s.label for s in samples] == [0, 3]
    assert samples[0].raw.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert samples[1].raw.tolist() == [[6, 5, 4], [3, 2, 1]]
    assert all(s.reply is None for s in samples)
    assert source.errors == {"parse": 2, "shape": 1, "nonfinite": 1}
    assert source.exhausted
    assert source.last_error is not None and "in.csv line 7" in source.last_error


def test_csv_without_header_takes_a_label_index_and_loops(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("1,2,3,4,5,6,7\n8,9,10,11,12,13,14\n")
    source = FileSource(path, SHAPE, label_column=-1, loop=True)
    labels = [source.poll(0).label for _ in range(5)]  # type: ignore[union-attr]
    assert labels == [7, 14, 7, 14, 7]
    assert not source.exhausted
    source.close()
    assert source.poll(0) is None and source.exhausted


def test_a_looping_file_without_one_good_row_ends(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("1,2\n")
    source = FileSource(path, SHAPE, loop=True)
    assert list(source) == []
    assert source.errors == {"shape": 1}


def test_npz_replay(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(4, 6)
    x[2, 1] = np.nan
    path = tmp_path / "in.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2, 3]))
    source = FileSource(path, SHAPE)
    samples = list(source)
    assert [s.label for s in samples] == [0, 1, 3]
    assert samples[1].raw.shape == SHAPE
    assert source.errors == {"nonfinite": 1}


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("missing.csv", None, "does not exist"),
        ("in.txt", b"1,2", "unknown format '.txt'"),
        ("in.npz", b"not a zip", "not a readable NPZ"),
    ],
)
def test_an_unreadable_file_is_refused_at_open(
    tmp_path: Path, name: str, content: bytes | None, words: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SourceError, match=words):
        list(FileSource(path, SHAPE))


def test_npz_arrays_must_fit_the_input_shape(tmp_path: Path) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((3, 5)))
    with pytest.raises(
        SourceError, match=r"samples of shape \[2, 3\] \(6 values\), got .*\[3, 5\]"
    ):
        FileSource(path, SHAPE)
    np.savez(path, features=np.zeros((3, 6)))
    with pytest.raises(SourceError, match="has no array 'x'; arrays: \\['features'\\]"):
        FileSource(path, SHAPE)


def test_a_csv_label_column_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b,c,d,e,f\n1,2,3,4,5,6\n")
    with pytest.raises(SourceError, match="label column 'label' is not in the header"):
        FileSource(path, SHAPE, label_column="label")
    with pytest.raises(SourceError, match="label column 6 does not exist in rows of 6 columns"):
        FileSource(path, SHAPE, label_column=6)


def test_rate_limited_source_holds_back_samples(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("1,2,3,4,5,6\n" * 3)
    source = FileSource(path, SHAPE, rate_hz=0.5)
    assert source.poll(0) is not None  # the first is due at once
    assert source.poll(0.01) is None  # the next one in 2 s
    assert not source.exhausted
    source.close()


# -- synthetic ---------------------------------------------------------------------------------


@pytest.fixture
def base() -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([np.full(SHAPE, float(c)) for c in range(3)] * 4)
    y = np.array([0, 1, 2] * 4)
    return x, y


def test_synthetic_source_applies_gain_and_offset(base: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = base
    source = SyntheticSource(x, y, gain=2.0, offset=0.5, count=50)
    samples = list(source)
    assert len(samples) == 50 and source.exhausted
    for sample in samples:
        assert sample.raw.dtype == np.float32 and sample.raw.shape == SHAPE
        assert np.all(sample.raw == sample.label * 2.0 + 0.5)


def test_synthetic_source_is_seeded_and_noisy(base: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = base
    first = [s.raw for s in SyntheticSource(x, y, noise=0.5, seed=7, count=200)]
    again = [s.raw for s in SyntheticSource(x, y, noise=0.5, seed=7, count=200)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    labels = [s.label for s in SyntheticSource(x, y, noise=0.5, seed=7, count=200)]
    residual = np.stack(first) - np.array(labels, dtype=np.float32)[:, None, None]
    assert 0.4 < float(residual.std()) < 0.6


def test_synthetic_class_mix_draws_only_the_named_classes(
    base: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = base
    source = SyntheticSource(x, y, class_mix={0: 3.0, 2: 1.0}, count=2000)
    labels = np.array([s.label for s in source])
    assert set(labels.tolist()) == {0, 2}
    assert 0.7 < float(np.mean(labels == 0)) < 0.8


def test_synthetic_drift_changes_while_running(base: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = base
    source = SyntheticSource(x, y, class_mix={1: 1.0})
    assert np.all(source.poll(0).raw == 1.0)  # type: ignore[union-attr]
    source.set_drift(offset=10.0)
    assert np.all(source.poll(0).raw == 11.0)  # type: ignore[union-attr]
    source.set_drift(class_mix={2: 1.0})
    assert source.poll(0).label == 2  # type: ignore[union-attr]
    assert not source.exhausted


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"class_mix": {7: 1.0}}, r"labels \[7\] that the base samples lack"),
        ({"class_mix": {0: 0.0}}, "weights must be >= 0, one > 0"),
        ({"noise": -1.0}, "noise must be >= 0"),
        ({"input_shape": (4,)}, r"expected \[4\] \(4 values\)"),
    ],
)
def test_synthetic_settings_are_checked(
    base: tuple[np.ndarray, np.ndarray], kwargs: dict[str, Any], words: str
) -> None:
    x, y = base
    with pytest.raises(SourceError, match=words):
        SyntheticSource(x, y, **kwargs)


def test_synthetic_source_from_npz(tmp_path: Path, base: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = base
    path = tmp_path / "base.npz"
    np.savez(path, x=x.reshape(len(x), -1), y=y)
    source = SyntheticSource.from_npz(path, input_shape=SHAPE, count=3, seed=1)
    assert [s.raw.shape for s in source] == [SHAPE] * 3
    np.savez(path, x=x)
    with pytest.raises(SourceError, match="needs arrays 'x' and 'y'"):
        SyntheticSource.from_npz(path)


# -- when the next sample is due ---------------------------------------------------------------


def test_a_source_that_cannot_tell_when_its_next_sample_comes_has_no_ready_time() -> None:
    source = StdinSource(io.StringIO("1,2,3,4,5,6\n"), SHAPE, out=io.StringIO())
    assert source.ready_at() is None  # samples arrive when someone writes them
    assert source.poll(10) is not None
    assert source.ready_at() is None
    source.close()


def test_a_paced_source_is_ready_one_period_after_its_last_sample(
    base: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = base
    rate_hz = 0.01  # a sample every 100 s: the next one is never due during the test
    source = SyntheticSource(x, y, rate_hz=rate_hz, count=5)
    assert source.ready_at() is None  # before the first sample: poll, it is due at once

    before = time.monotonic()
    assert source.poll(0) is not None
    after = time.monotonic()

    ready = source.ready_at()
    assert ready is not None
    assert before + 1 / rate_hz <= ready <= after + 1 / rate_hz
    assert ready >= time.monotonic()
    assert source.poll(0) is None  # not due yet: poll has nothing, and the time stays
    assert source.ready_at() == ready
    source.close()
    assert source.ready_at() is None  # closed: no sample will come


def test_a_paced_source_moves_its_ready_time_on_and_drops_it_at_the_end(
    base: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = base
    rate_hz = 200.0
    source = SyntheticSource(x, y, rate_hz=rate_hz, count=2)
    assert source.poll(10) is not None
    first = source.ready_at()
    assert first is not None
    assert source.poll(10) is not None
    second = source.ready_at()
    assert second is not None and second >= first + 1 / rate_hz

    assert source.poll(10) is None  # the third is due, but the count is reached
    assert source.exhausted
    assert source.ready_at() is None


def test_an_unpaced_source_has_no_ready_time(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("1,2,3,4,5,6\n" * 3)
    source = FileSource(path, SHAPE)  # no rate: every poll answers at once
    assert source.ready_at() is None
    assert source.poll(0) is not None
    assert source.ready_at() is None
    assert len(list(source)) == 2 and source.exhausted
    assert source.ready_at() is None


# -- stdin -------------------------------------------------------------------------------------


def test_stdin_lines_are_answered_in_order_as_json_lines() -> None:
    stream = io.StringIO("1,2,3,4,5,6\n# a comment\n\n1 2 3\n[1,2,3,4,5,6]\nhello\n6,5,4,3,2,1\n")
    out = io.StringIO()
    source = StdinSource(stream, SHAPE, out=out)
    for sample in source:
        assert sample.reply is not None
        sample.reply(sum_answer(sample))
    assert source.exhausted
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [a["line"] for a in answers] == [1, 4, 5, 6, 7]
    assert [a.get("label") for a in answers] == [21, None, 21, None, 21]
    assert "expected shape [2, 3] (6 values), got shape [3]" in answers[1]["error"]
    assert "'hello' is not a number" in answers[3]["error"]
    assert source.errors == {"shape": 1, "parse": 1}


# -- HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def http_source() -> Iterator[HttpSource]:
    source = HttpSource("127.0.0.1", 0, SHAPE, reply_timeout_s=5.0)
    yield source
    source.close()


def request(
    source: HttpSource, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", source.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post(source: HttpSource, document: object) -> tuple[int, dict[str, Any]]:
    return request(source, "POST", "/v1/predict", json.dumps(document).encode())


def test_http_predict_one_sample_and_many(http_source: HttpSource) -> None:
    daemon = answer_all(http_source, lambda s: {**sum_answer(s), "model_id": "m-1"})
    status, answer = post(http_source, {"inputs": [[1, 2, 3], [4, 5, 6]]})
    assert status == 200
    assert answer == {"label": 21, "confidence": 1.0, "probabilities": [1.0], "model_id": "m-1"}
    status, answer = post(http_source, {"instances": [[1] * 6, [2] * 6, [0] * 6]})
    assert status == 200
    assert [p["label"] for p in answer["predictions"]] == [6, 12, 0]
    http_source.close()
    daemon.join(timeout=5)
    assert not daemon.is_alive()  # iteration ends on close


@pytest.mark.parametrize(
    ("body", "status", "kind", "words"),
    [
        (b"{not json", 400, "parse", "not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, 400, "parse", "not valid JSON"),  # too deep to parse
        (b'{"x": 1}', 400, "parse", '{"inputs": [...]}'),
        (b'{"inputs": [1, 2, 3]}', 400, "shape", "inputs: expected shape [2, 3] (6 values)"),
        (b'{"inputs": [1, 2, 3, 4, 5, NaN]}', 400, "nonfinite", "NaN or infinite"),
        (b'{"inputs": [1, 2, 3, 4, 5, "a"]}', 400, "dtype", "expected numbers"),
        (b'{"instances": [[1,1,1,1,1,1], [1]]}', 400, "shape", "instances[1]: expected shape"),
        (b'{"inputs": [' + b"1," * 600_000 + b"1]}", 413, "too_large", "exceeds"),
    ],
)
def test_http_bad_requests_are_answered_and_counted(
    http_source: HttpSource, body: bytes, status: int, kind: str, words: str
) -> None:
    got_status, answer = request(http_source, "POST", "/v1/predict", body)
    assert got_status == status
    assert words in answer["error"]
    assert http_source.errors == {kind: 1}
    assert http_source.poll(0) is None  # nothing reached the daemon


def test_http_without_an_answer_in_time_is_503() -> None:
    source = HttpSource("127.0.0.1", 0, SHAPE, reply_timeout_s=0.2)
    try:
        status, answer = post(source, {"inputs": [0] * 6})
        assert status == 503 and "no answer within 0.2 s" in answer["error"]
        assert source.errors == {"timeout": 1}
    finally:
        source.close()


def test_http_error_answers_from_the_daemon_keep_their_status(http_source: HttpSource) -> None:
    answer_all(http_source, lambda s: {"error": "no model loaded", "status": 503})
    status, answer = post(http_source, {"inputs": [0] * 6})
    assert (status, answer) == (503, {"error": "no model loaded"})


def test_an_answer_that_is_not_json_becomes_an_error(http_source: HttpSource) -> None:
    answer_all(http_source, lambda s: {"label": 0, "probabilities": [float("nan")]})
    status, answer = post(http_source, {"inputs": [0] * 6})
    assert status == 500 and "cannot be sent as JSON" in answer["error"]
    out = io.StringIO()
    source = StdinSource(io.StringIO("1,2,3,4,5,6\n"), SHAPE, out=out)
    sample = source.poll(5.0)
    assert sample is not None and sample.reply is not None
    sample.reply({"confidence": float("inf")})
    assert "cannot be sent as JSON" in json.loads(out.getvalue())["error"]


def test_http_health_and_unknown_paths(http_source: HttpSource) -> None:
    status, answer = request(http_source, "GET", "/v1/health")
    assert status == 200 and answer["status"] == "ok" and answer["pending"] == 0
    assert request(http_source, "GET", "/v2/other")[0] == 404
    assert request(http_source, "POST", "/v1/other", b"{}")[0] == 404


def test_http_requests_waiting_at_close_get_503(http_source: HttpSource) -> None:
    result: list[tuple[int, dict[str, Any]]] = []
    client = threading.Thread(target=lambda: result.append(post(http_source, {"inputs": [0] * 6})))
    client.start()
    assert http_source.poll(5.0) is not None  # queued; never answered
    http_source.close()
    client.join(timeout=10)
    assert result and result[0][0] == 503 and "shutting down" in result[0][1]["error"]


def test_http_port_in_use_is_a_source_error(http_source: HttpSource) -> None:
    with pytest.raises(SourceError, match=f"cannot listen on 127.0.0.1:{http_source.port}"):
        HttpSource("127.0.0.1", http_source.port, SHAPE)


# -- local MQTT --------------------------------------------------------------------------------


def test_local_mqtt_requests_are_answered(mosquitto_url: str) -> None:
    source = LocalMqttSource(mosquitto_url, "app/predict", "app/answers", SHAPE, client_id="src")
    app = MqttLink(MqttEndpoint.parse(mosquitto_url), "app")
    app.subscribe("app/#")
    app.start(wait_s=10)
    try:
        assert source.link.wait_connected(10)
        wait_subscribed(app, "app/answers")
        answer_all(source, sum_answer)
        # a client may only start once the source's subscription is in place: retry the first
        request = {"id": 1, "inputs": [1, 1, 1, 1, 1, 1]}
        answer: Message | None = None
        for _ in range(20):
            app.publish("app/predict", json.dumps(request).encode())
            answer = next_message(app, "app/answers", timeout_s=0.5)
            if answer is not None:
                break
        assert answer is not None and json.loads(answer.payload)["label"] == 6

        app.publish(
            "app/predict",
            json.dumps({"id": "a", "inputs": [2] * 6, "reply_to": "app/mine"}).encode(),
        )
        mine = next_message(app, "app/mine")
        assert mine is not None and json.loads(mine.payload) == {
            "id": "a",
            **sum_answer(Sample(np.full(SHAPE, 2.0))),
        }

        for payload in (b"garbage", json.dumps({"id": 3, "inputs": [1, 2]}).encode()):
            app.publish("app/predict", payload)
            error = next_message(app, "app/answers")
            assert error is not None and "error" in json.loads(error.payload)
        app.publish("app/predict", json.dumps({"inputs": [0] * 6, "reply_to": "app/#"}).encode())
        error = next_message(app, "app/answers")
        assert (
            error is not None and "reply_to must be a topic" in json.loads(error.payload)["error"]
        )
        assert source.errors == {"parse": 2, "shape": 1}
    finally:
        app.stop()
        source.close()


def test_local_mqtt_answers_may_not_loop_back() -> None:
    with pytest.raises(SourceError, match="would match"):
        LocalMqttSource("mqtt://127.0.0.1:1", "app/#", "app/answers", SHAPE)


# -- configuration -----------------------------------------------------------------------------


def test_config_opens_each_local_kind(tmp_path: Path, base: tuple[np.ndarray, np.ndarray]) -> None:
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("1,2,3,4,5,6\n")
    npz_path = tmp_path / "base.npz"
    np.savez(npz_path, x=base[0], y=base[1])
    configs = {
        FileSource: SourceConfig(kind="file", path=csv_path, loop=True),
        SyntheticSource: SourceConfig(kind="synthetic", path=npz_path, gain=2.0, count=5),
        HttpSource: SourceConfig(kind="http", port=0),
        StdinSource: SourceConfig(kind="stdin"),
    }
    for cls, config in configs.items():
        source = open_source(
            config, SHAPE, stdin=io.StringIO("1,2,3,4,5,6\n"), stdout=io.StringIO()
        )
        try:
            assert isinstance(source, cls)
            assert (source.poll(0) is None) if cls is HttpSource else source.poll(5.0) is not None
        finally:
            source.close()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"kind": "file"}, "source kind 'file' needs path"),
        ({"kind": "http", "port": 8080, "path": "x.csv"}, "'http' takes no field(s) path"),
        ({"kind": "mqtt", "topic_in": "a"}, "needs topic_out"),
        ({"kind": "mqtt", "url": "http://x", "topic_in": "a", "topic_out": "b"}, "scheme must"),
        ({"kind": "serial"}, "Input should be"),
        ({"kind": "stdin", "colour": "red"}, "Extra inputs are not permitted"),
        ({"kind": "synthetic", "path": "b.npz", "noise": -1}, "greater than or equal to 0"),
    ],
)
def test_config_refuses_what_the_kind_does_not_take(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SourceConfig(**fields)
