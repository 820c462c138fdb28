"""Tests of `loadtest/`: the wire codec without sockets, then short real runs.

The smoke runs start real servers on 127.0.0.1 through `python -m loadtest`, against the
websockets peer and against our `examples/echo.py`, with a few clients each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# loadtest is run from the repository root and not installed (PyPI has an unrelated
# `loadtest`): put ours first on the path, as `python -m loadtest` from the root does.
if sys.path[0] != str(REPO_ROOT):
    sys.path.insert(0, str(REPO_ROOT))

from loadtest import wire  # noqa: E402
from loadtest.cli import main  # noqa: E402
from loadtest.client import (  # noqa: E402
    ClientPool,
    LoopbackOnlyError,
    RecordCounter,
    WsClient,
    check_loopback,
    source_addresses,
)
from loadtest.measure import latency_summary, percentile  # noqa: E402
from loadtest.report import ratios, summarize  # noqa: E402

ECHO_EXAMPLE = REPO_ROOT / "examples" / "echo.py"
HAS_WEBSOCKETS = importlib.util.find_spec("websockets") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

# -- wire: no sockets --------------------------------------------------------------------


def test_the_loadtest_under_test_is_this_repositorys() -> None:
    assert Path(wire.__file__).resolve().parent == REPO_ROOT / "loadtest"


def test_accept_matches_rfc_example() -> None:
    # RFC 6455 §1.3
    assert wire.accept_for(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_mask_is_an_involution_and_matches_bytewise_xor() -> None:
    mask = b"\x01\x80\xfe\x37"
    for size in (0, 1, 3, 4, 5, 125, 1000):
        payload = bytes((index * 7) % 256 for index in range(size))
        masked = wire.mask_payload(payload, mask)
        assert masked == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert wire.mask_payload(masked, mask) == payload


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_parser_reads_7_16_and_64_bit_lengths(size: int) -> None:
    payload = os.urandom(size)
    frame = wire.encode_frame(wire.Opcode.BINARY, payload)
    header = {0: 2, 125: 2, 126: 4, 65535: 4}.get(size, 10)
    assert len(frame) == header + size
    assert wire.FrameParser().feed(frame) == [(wire.Opcode.BINARY, payload)]


def test_whole_message_fast_path_agrees_with_feed_or_declines() -> None:
    """The client's fast path takes only a read that is exactly one whole, valid data
    frame; it gives what `feed` gives for it, and declines everything else (which `feed`
    then parses or rejects), so it cannot accept what `feed` would refuse."""
    compressed_text = wire.encode_frame(wire.Opcode.TEXT, b"abc", compressed=True)
    taken = [
        wire.encode_frame(wire.Opcode.TEXT, b"hello"),
        wire.encode_frame(wire.Opcode.BINARY, b""),
        wire.encode_frame(wire.Opcode.BINARY, os.urandom(1000)),
        wire.encode_frame(wire.Opcode.BINARY, os.urandom(70000)),
    ]
    for frame in taken:
        assert wire.FrameParser().whole_message(frame) == wire.FrameParser().feed(frame)[0]
    flagged = wire.FrameParser(compressed=True).whole_message(compressed_text)
    assert flagged == (wire.Opcode.TEXT | wire.COMPRESSED, b"abc")
    declined = [
        b"\x81",  # too short
        wire.encode_frame(wire.Opcode.TEXT, b"hello")[:-1],  # incomplete
        wire.encode_frame(wire.Opcode.TEXT, b"a") * 2,  # two frames
        wire.encode_frame(wire.Opcode.TEXT, b"hel", fin=False),  # a first fragment
        wire.encode_frame(wire.Opcode.PING, b"p"),  # control frames go through feed
        wire.encode_frame(wire.Opcode.TEXT, b"x", mask=b"abcd"),  # masked: feed rejects it
        compressed_text,  # RSV1 without deflate agreed: feed rejects it
        bytes([0x80 | 0x20 | wire.Opcode.TEXT, 0]),  # RSV2
        wire.encode_frame(3, b"x"),  # reserved opcode
    ]
    for frame in declined:
        assert wire.FrameParser().whole_message(frame) is None, frame
    assert wire.FrameParser(max_message=10).whole_message(taken[2]) is None  # over the limit
    parser = wire.FrameParser()
    parser.feed(wire.encode_frame(wire.Opcode.TEXT, b"hel", fin=False))
    assert parser.whole_message(taken[0]) is None  # a fragmented message under way
    assert parser.feed(b"\x81") == [] and parser.whole_message(taken[0]) is None  # buffered


def test_client_frame_is_masked_and_decodes() -> None:
    mask = b"abcd"
    frame = wire.encode_frame(wire.Opcode.TEXT, b"hello", mask=mask)
    assert frame[1] & 0x80 and frame[2:6] == mask
    assert wire.mask_payload(frame[6:], mask) == b"hello"


def test_parser_reassembles_fragments_around_a_ping_fed_byte_by_byte() -> None:
    stream = (
        wire.encode_frame(wire.Opcode.TEXT, b"hel", fin=False)
        + wire.encode_frame(wire.Opcode.PING, b"p")
        + wire.encode_frame(wire.Opcode.CONTINUATION, b"lo ", fin=False)
        + wire.encode_frame(wire.Opcode.CONTINUATION, b"world")
        + wire.encode_frame(wire.Opcode.BINARY, b"\x00" * 300)
    )
    parser = wire.FrameParser()
    messages = []
    for index in range(len(stream)):
        messages += parser.feed(stream[index : index + 1])
    assert messages == [
        (wire.Opcode.PING, b"p"),
        (wire.Opcode.TEXT, b"hello world"),
        (wire.Opcode.BINARY, b"\x00" * 300),
    ]


@pytest.mark.parametrize(
    "frame",
    [
        wire.encode_frame(wire.Opcode.TEXT, b"x", mask=b"abcd"),  # masked by the server
        bytes([0x80 | 0x40 | wire.Opcode.TEXT, 1]) + b"x",  # RSV1 without an extension
        wire.encode_frame(wire.Opcode.CONTINUATION, b"x"),  # nothing to continue
        wire.encode_frame(wire.Opcode.PING, b"x", fin=False),  # fragmented control frame
        wire.encode_frame(wire.Opcode.PING, b"x" * 126),  # control frame too long
        wire.encode_frame(3, b"x"),  # reserved opcode
    ],
)
def test_parser_rejects_protocol_violations(frame: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.FrameParser().feed(frame)


def test_compressed_messages_come_flagged_and_inflate_back() -> None:
    """With deflate agreed, RSV1 on a first frame is the COMPRESSED flag, fragments and
    all; the payload is left as it came and the Inflater gets the message back."""
    message = json.dumps([{"user": "alpha", "n": index} for index in range(40)]).encode()
    compressed = wire.deflate_message(message, 12)
    assert len(compressed) < len(message) / 2
    half = len(compressed) // 2
    stream = (
        wire.encode_frame(wire.Opcode.TEXT, compressed, compressed=True)
        + wire.encode_frame(wire.Opcode.TEXT, compressed[:half], fin=False, compressed=True)
        + wire.encode_frame(wire.Opcode.PING, b"p")
        + wire.encode_frame(wire.Opcode.CONTINUATION, compressed[half:])
        + wire.encode_frame(wire.Opcode.BINARY, b"plain")
    )
    parser = wire.FrameParser(compressed=True)
    messages = []
    for index in range(0, len(stream), 7):  # reads that cut frames anywhere
        messages += parser.feed(stream[index : index + 7])
    flagged = wire.Opcode.TEXT | wire.COMPRESSED
    assert messages == [
        (flagged, compressed),
        (wire.Opcode.PING, b"p"),
        (flagged, compressed),
        (wire.Opcode.BINARY, b"plain"),
    ]
    inflater = wire.Inflater()  # one stream for the connection, as the checker keeps
    assert inflater.inflate(compressed) == message
    assert inflater.inflate(compressed) == message
    with pytest.raises(wire.ProtocolError, match="does not inflate"):
        wire.Inflater().inflate(b"\xff\xff\xff")


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x80 | 0x40 | wire.Opcode.PING, 0]),  # RSV1 on a control frame
        wire.encode_frame(wire.Opcode.TEXT, b"a", fin=False)
        + bytes([0x80 | 0x40 | wire.Opcode.CONTINUATION, 0]),  # RSV1 on a continuation
        bytes([0x80 | 0x20 | wire.Opcode.TEXT, 0]),  # RSV2: no extension uses it
    ],
)
def test_deflate_allows_rsv1_on_first_data_frames_only(frame: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.FrameParser(compressed=True).feed(frame)


@pytest.mark.parametrize(
    ("answer", "bits"),
    [
        ("permessage-deflate", 15),
        ("permessage-deflate; server_no_context_takeover; client_max_window_bits=12", 12),
        ('permessage-deflate; client_max_window_bits="10"', 10),
    ],
)
def test_deflate_window_bits_follow_the_answer(answer: str, bits: int) -> None:
    assert wire.deflate_window_bits(answer) == bits


@pytest.mark.parametrize(
    "answer",
    [
        "x-webkit-deflate-frame",
        "permessage-deflate; client_max_window_bits=8",
        "permessage-deflate; client_max_window_bits=16",
    ],
)
def test_deflate_answers_the_generator_cannot_keep_to_are_errors(answer: str) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.deflate_window_bits(answer)


def test_json_like_bodies_are_json_of_the_exact_size() -> None:
    from loadtest.scenarios import json_like

    rng = random.Random(1)
    for size in (16, 100, 1024, 16384):
        body = json_like(rng, size)
        assert len(body) == size
        records = json.loads(body)
        assert isinstance(records, list)
    assert len(zlib.compress(json_like(rng, 1024), 6)) < 700  # text that deflates, not noise


def test_parser_enforces_message_limit() -> None:
    parser = wire.FrameParser(max_message=10)
    with pytest.raises(wire.ProtocolError):
        parser.feed(wire.encode_frame(wire.Opcode.BINARY, b"x" * 11))


def test_upgrade_response_checks() -> None:
    key = wire.new_key()
    good = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + wire.accept_for(key)
    )
    wire.check_upgrade_response(good, key)
    with pytest.raises(wire.ProtocolError):
        wire.check_upgrade_response(good.replace(b"101", b"400"), key)
    with pytest.raises(wire.ProtocolError):
        wire.check_upgrade_response(good, wire.new_key())


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def test_client_upgrades_answers_ping_and_echoes_close() -> None:
    class Recording(ClientPool):
        messages: list[tuple[int, bytes]] = []

        def on_message(self, client: WsClient, opcode: int, payload: bytes) -> None:
            self.messages.append((opcode, payload))

    pool = Recording("127.0.0.1", 9)
    client = pool.new_client()
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written.startswith(b"GET / HTTP/1.1\r\n")
    transport.written.clear()
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + wire.accept_for(client.key) + b"\r\n\r\n"
    )
    # The head and the first frames may share one chunk.
    client.data_received(response[:20])
    client.data_received(response[20:] + wire.encode_frame(wire.Opcode.PING, b"hi"))
    assert pool.open_count == 1 and len(pool.handshake_times) == 1
    # Client frames are masked: decode the pong by hand.
    assert transport.written[0] == 0x80 | wire.Opcode.PONG and transport.written[1] == 0x80 | 2
    assert wire.mask_payload(bytes(transport.written[6:]), bytes(transport.written[2:6])) == b"hi"
    client.data_received(wire.encode_frame(wire.Opcode.TEXT, b"hello"))
    assert pool.messages == [(wire.Opcode.TEXT, b"hello")]
    transport.written.clear()
    client.data_received(wire.encode_frame(wire.Opcode.CLOSE, wire.close_payload(1001)))
    assert client.close_code == 1001
    assert transport.written[0] == 0x80 | wire.Opcode.CLOSE  # the close is echoed
    client.data_received(wire.encode_frame(wire.Opcode.TEXT, b"x", mask=b"abcd"))
    assert client.error is not None and transport.closed


# -- helpers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.0.9", "::1"])
def test_loopback_hosts_are_accepted(host: str) -> None:
    assert check_loopback(host) == host


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.1", "192.168.1.1", "::", "localhost", "x"])
def test_other_hosts_are_rejected(host: str) -> None:
    with pytest.raises(LoopbackOnlyError):
        check_loopback(host)


def test_non_loopback_host_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["echo", "--server", "websockets", "--host", "8.8.8.8"])
    assert exit_info.value.code == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_source_addresses_grow_past_one_address_worth_of_ports() -> None:
    assert source_addresses("127.0.0.1", 8000) == [None]
    assert source_addresses("127.0.0.1", 60000) == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert source_addresses("::1", 60000) == [None]


def test_percentiles_and_ratios() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99
    summary = latency_summary([0.001, 0.002, 0.003], "x")
    assert summary["x_p50_ms"] == pytest.approx(2.0)
    runs: list[dict[str, Any]] = [
        {"server": "enjent", "metrics": {"a_per_s": 300.0}},
        {"server": "enjent", "metrics": {"a_per_s": 100.0}},
        {"server": "enjent", "metrics": {"a_per_s": 200.0}},
        {"server": "websockets", "metrics": {"a_per_s": 100.0}},
    ]
    assert ratios(summarize(runs), "enjent") == {"websockets": {"a_per_s": 2.0}}


# -- smoke runs against real servers ----------------------------------------------------------


def servers() -> list[Any]:
    return [
        pytest.param(
            "websockets",
            marks=pytest.mark.skipif(not HAS_WEBSOCKETS, reason="websockets is not installed"),
        ),
        pytest.param(
            "enjent",
            marks=pytest.mark.skipif(
                not ECHO_EXAMPLE.exists(), reason="examples/echo.py does not exist yet"
            ),
        ),
    ]


def run_loadtest(
    tmp_path: Path, *args: str, timeout: float = 60
) -> tuple[int, dict[str, Any], str]:
    json_path = tmp_path / "result.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            *args,
            "--quiet",
            "--json",
            str(json_path),
            "--timeout",
            str(timeout - 10),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = completed.stdout + completed.stderr
    assert json_path.exists(), output
    return completed.returncode, json.loads(json_path.read_text()), output


def only_run(document: dict[str, Any], server: str) -> dict[str, Any]:
    assert set(document) >= {
        "scenario",
        "command",
        "machine",
        "config",
        "runs",
        "summary",
        "ratios",
        "ok",
    }
    (run,) = document["runs"]
    assert run["server"] == server
    assert {"ok", "failures", "metrics", "details", "series", "server_exit_code"} <= set(run)
    return run


def assert_latencies(metrics: dict[str, float], prefix: str) -> None:
    p50, p99 = metrics[f"{prefix}_p50_ms"], metrics[f"{prefix}_p99_ms"]
    assert 0 < p50 <= p99 <= metrics[f"{prefix}_max_ms"]


@pytest.mark.parametrize("server", servers())
def test_connections_smoke(tmp_path: Path, server: str) -> None:
    chart = [] if server == "websockets" else ["--no-chart"]
    code, document, output = run_loadtest(
        tmp_path,
        "connections",
        "--server",
        server,
        "--clients",
        "20",
        "--rate",
        "0",
        "--hold",
        "0.2",
        "--measure",
        "0.3",
        *chart,
    )
    assert code == 0, output
    run = only_run(document, server)
    metrics = run["metrics"]
    assert metrics["clients_connected"] == 20 and metrics["clients_failed"] == 0
    assert metrics["uss_bytes"] > 0 and metrics["server_fds"] >= 20
    assert sum(p["connections"] for p in run["details"]["window"]["processes"]) == 20
    assert_latencies(metrics, "upgrade")
    assert len(run["series"]["memory"]) >= 2
    assert "uss_per_client_bytes" in output
    if not chart and HAS_MATPLOTLIB:
        assert (tmp_path / "result.png").stat().st_size > 0


@pytest.mark.parametrize("server", servers())
def test_echo_smoke(tmp_path: Path, server: str) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "echo",
        "--server",
        server,
        "--clients",
        "20",
        "--sizes",
        "32,1k,16k",
        "--pipeline",
        "2",
        "--duration",
        "0.3",
        "--warmup",
        "0",
        "--no-chart",
    )
    assert code == 0, output
    run = only_run(document, server)
    for key in ("32B", "1024B", "16384B"):
        detail = run["details"]["sizes"][key]
        assert detail["sent"] == detail["received"] >= detail["measured"] > 0
        assert run["metrics"][f"echo_{key}_messages_per_s"] > 0
        assert_latencies(run["metrics"], f"echo_{key}_rtt")


@pytest.mark.parametrize("server", servers())
def test_echo_message_budget_is_exact(tmp_path: Path, server: str) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "echo",
        "--server",
        server,
        "--clients",
        "10",
        "--sizes",
        "100",
        "--messages",
        "500",
        "--warmup",
        "0",
        "--pipeline",
        "3",
        "--text",
        "--no-chart",
    )
    assert code == 0, output
    detail = only_run(document, server)["details"]["sizes"]["100B"]
    assert detail["sent"] == detail["received"] == detail["measured"] == 500


@pytest.mark.parametrize("server", servers())
def test_fanout_smoke(tmp_path: Path, server: str) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "fanout",
        "--server",
        server,
        "--clients",
        "20",
        "--broadcasts",
        "10",
        "--no-chart",
    )
    assert code == 0, output
    metrics = only_run(document, server)["metrics"]
    assert metrics["fanout_broadcasts"] == 10
    assert metrics["fanout_deliveries"] == 10 * 20
    assert_latencies(metrics, "fanout_last")


@pytest.mark.parametrize("server", servers())
def test_handshake_smoke(tmp_path: Path, server: str) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "handshake",
        "--server",
        server,
        "--count",
        "100",
        "--clients",
        "5",
        "--no-chart",
    )
    assert code == 0, output
    run = only_run(document, server)
    assert run["metrics"]["handshakes"] == 100 and run["metrics"]["handshakes_failed"] == 0
    assert run["details"]["clean_closes"] == 100
    assert_latencies(run["metrics"], "upgrade")
    assert_latencies(run["metrics"], "cycle")


@pytest.mark.parametrize("server", servers())
def test_echo_with_deflate_agreed_sends_and_counts_compressed_frames(
    tmp_path: Path, server: str
) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "echo",
        "--server",
        server,
        "--offer-deflate",
        "--content",
        "json",
        "--clients",
        "6",
        "--sizes",
        "1k,16k",
        "--messages",
        "300",
        "--warmup",
        "0",
        "--pipeline",
        "2",
        "--no-chart",
    )
    assert code == 0, output
    run = only_run(document, server)
    assert run["metrics"]["clients_with_extension"] == 6
    for key, size in (("1024B", 1024), ("16384B", 16384)):
        detail = run["details"]["sizes"][key]
        assert detail["sent"] == detail["received"] == 300
        # every echo came compressed, and the checker inflated and compared its own
        assert detail["compressed"] == 300 and detail["checked_after_inflating"] > 0
        assert detail["distinct_messages"] > 1
        (mean,) = detail["compressed_frame_bytes"].values()
        assert mean < size * 0.7
        assert run["metrics"][f"echo_{key}_compressed_fraction"] == 1.0


@pytest.mark.parametrize("server", servers())
def test_fanout_with_deflate_agreed_counts_compressed_broadcasts(
    tmp_path: Path, server: str
) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "fanout",
        "--server",
        server,
        "--offer-deflate",
        "--content",
        "json",
        "--payload",
        "1024",
        "--clients",
        "15",
        "--broadcasts",
        "8",
        "--no-chart",
    )
    assert code == 0, output
    metrics = only_run(document, server)["metrics"]
    assert metrics["fanout_deliveries"] == 8 * 15
    assert metrics["fanout_compressed_fraction"] == 1.0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="--tls needs the openssl command")
@pytest.mark.parametrize("server", servers())
def test_echo_and_fanout_over_tls(tmp_path: Path, server: str) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "echo",
        "--server",
        server,
        "--tls",
        "--clients",
        "5",
        "--sizes",
        "100,200k",
        "--messages",
        "100",
        "--warmup",
        "0",
        "--no-chart",
    )
    assert code == 0, output
    run = only_run(document, server)
    assert "--ssl-certfile" in run["server_command"]
    for key in ("100B", "204800B"):
        detail = run["details"]["sizes"][key]
        assert detail["sent"] == detail["received"] == detail["measured"] == 100
    # all but the sender and the checking client count records without decrypting
    assert tls_fanout(tmp_path, server, clients=10, broadcasts=5) == (50, 8)
    assert tls_fanout(tmp_path, server, "--decrypt-all", clients=4, broadcasts=3) == (12, 0)


def tls_fanout(
    tmp_path: Path, server: str, *args: str, clients: int, broadcasts: int
) -> tuple[int, int]:
    """A fan-out over TLS: (deliveries, receivers that counted without decrypting)."""
    code, document, output = run_loadtest(
        tmp_path,
        "fanout",
        "--server",
        server,
        "--tls",
        *args,
        "--clients",
        str(clients),
        "--broadcasts",
        str(broadcasts),
        "--no-chart",
    )
    assert code == 0, output
    metrics = only_run(document, server)["metrics"]
    return metrics["fanout_deliveries"], metrics["fanout_undecrypted_clients"]


def tls13_records(plaintexts: list[int], kinds: list[int]) -> bytes:
    """TLS records as they travel: header, then a body of plaintext + 17 (TLS 1.3)."""
    out = bytearray()
    for size, kind in zip(plaintexts, kinds, strict=True):
        length = size + 17 if kind == 23 else size
        out += bytes([kind, 3, 3]) + length.to_bytes(2, "big") + os.urandom(length)
    return bytes(out)


def test_record_counter_counts_plaintext_at_every_cut() -> None:
    """The plaintext of application data records, counted when each record ends,
    whatever the reads; other records (an alert, say) count nothing."""
    sizes, kinds = [1028, 0, 5, 16384, 2], [23, 23, 21, 23, 23]
    stream = tls13_records(sizes, kinds)
    expected = 1028 + 0 + 16384 + 2
    rng = random.Random(7)
    for _ in range(200):
        counter, total, position = RecordCounter(), 0, 0
        while position < len(stream):
            step = rng.choice([1, 2, 3, 5, 7, 100, 1500, 20000])
            total += counter.feed(stream[position : position + step])
            position += step
        assert total == expected and counter.at_boundary
    counter = RecordCounter()
    assert counter.feed(stream[:-1]) == expected - 2  # the last record not yet whole
    assert not counter.at_boundary
    assert counter.feed(stream[-1:]) == 2 and counter.at_boundary


@pytest.mark.skipif(not HAS_WEBSOCKETS, reason="websockets is not installed")
def test_global_timeout_fails_the_run_and_stops_the_server(tmp_path: Path) -> None:
    code, document, output = run_loadtest(
        tmp_path,
        "connections",
        "--server",
        "websockets",
        "--clients",
        "5",
        "--hold",
        "60",
        "--no-chart",
        timeout=13,
    )
    assert code == 1, output
    assert document["ok"] is False
    (run,) = document["runs"]
    command = run["server_command"]
    leftovers = [
        process
        for process in psutil.process_iter(["cmdline"])
        if process.info["cmdline"] == command
    ]
    assert leftovers == []


def test_pool_counts_a_refused_connection() -> None:
    async def scenario() -> ClientPool:
        pool = ClientPool("127.0.0.1", 9)  # discard port: nothing listens there
        assert await pool.connect_one(None, 2.0) is None
        return pool

    pool = asyncio.run(scenario())
    assert pool.failed == 1 and pool.opened_total == 0 and sum(pool.errors.values()) == 1


# -- the in-process micro-benchmarks: small, fast runs so that they cannot rot -----


def _run_module(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"loadtest.{name}", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _module(name: str, *args: str) -> str:
    done = _run_module(name, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_parser_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "parser.json"
    _module("parser_bench", "--seconds", "0.05", "--json", str(out))
    results = json.loads(out.read_text())
    sizes = [row["size"] for row in results["parse"]]
    assert sizes == [32, 1024, 16384, 1 << 20]
    assert all(row["frames_per_s"] > 0 for row in results["parse"])
    assert all(row["apply_mask_mb_per_s"] > 0 for row in results["mask"])


def test_room_bench_smoke() -> None:
    output = _module("room_bench", "--members", "3", "--others", "0,40", "--calls", "20")
    rows = [line.split() for line in output.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "40"]
    assert all(float(row[1]) > 0 for row in rows)
    assert float(rows[0][2]) == 1.0


def test_transport_floor_smoke() -> None:
    output = _module("transport_floor", "--connections", "500")
    assert output.startswith("bare uvloop server: ")
    per_connection = int(output.split(": ")[1].split(" B")[0].replace(",", ""))
    assert 0 < per_connection < 64 * 1024


def test_kernel_send_reports_every_slice_of_every_run(tmp_path: Path) -> None:
    out = tmp_path / "sends.json"
    output = _module(
        "kernel_send",
        "--runs",
        "2",
        "--slices",
        "3",
        "--sends",
        "50",
        "--size",
        "4096",
        "--sender-cpu",
        "-1",
        "--reader-cpu",
        "-1",
        "--touch-mib",
        "8",
        "--json",
        str(out),
    )
    report = json.loads(out.read_text())
    assert len(report["first_touch_us"]) == 2
    assert all(value > 0 for value in report["first_touch_us"])
    assert "first write to a new page (8 MiB)" in output
    assert report["size"] == 4096 and report["sends"] == 50
    assert [len(run) for run in report["runs"]] == [3, 3]
    assert all(value > 0 for run in report["runs"] for value in run)
    assert [line.split(":")[0] for line in output.splitlines()[:2]] == ["run   1", "run   2"]
    assert "run medians:" in output


def test_kernel_send_refuses_a_cpu_it_may_not_use() -> None:
    done = _run_module("kernel_send", "--sender-cpu", "4096")
    assert done.returncode == 2
    assert "--sender-cpu 4096: this process may use CPUs" in done.stderr


def test_echo_path_answers_every_message_and_reports_each_repeat() -> None:
    """The in-process echo path: every message answered (the tool checks the bytes)."""
    output = _module(
        "echo_path",
        "--messages",
        "2048",
        "--repeat",
        "2",
        "--connections",
        "4",
        "--size",
        "200",
    )
    lines = output.splitlines()
    assert [line.split(":")[0] for line in lines] == ["repeat 1", "repeat 2"]
    assert all(float(line.split(": ")[1].split(" ")[0]) > 0 for line in lines)


def test_echo_path_fails_when_answers_go_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from loadtest import echo_path

    monkeypatch.setattr(echo_path.CountingTransport, "write", lambda self, data: None)
    with pytest.raises(RuntimeError, match="bytes of answers, expected"):
        asyncio.run(
            echo_path.run(size=10, per_read=2, connections=2, messages=40, repeat=1, seed=1)
        )


@pytest.mark.timeout(120)
def test_loadtest_publish_delivers_every_message_and_reports_the_engines() -> None:
    """``python -m loadtest publish``, small: an external publisher to a room of 30 clients
    on the embedded bus; exit 0 only when every message reached every receiver."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "publish", "--clients", "30", "--burst", "20",
         "--paced", "10", "--rate", "50", "--repeat", "1", "--engines", "enjent-zmq"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(600/600)" in done.stderr, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("| enjent-zmq |")]
    assert len(row) == 1, done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "loadtest", "publish", "--engines", "nope"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2 and "--engines" in bad.stderr
