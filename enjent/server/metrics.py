"""Counters and gauges in the Prometheus text exposition format (version 0.0.4).

Server layer: the metrics path (``/metrics`` by default) answers this text.
Every series carries a ``worker`` label; a family named ``enjent_cluster_*``
holds the sum over the workers this one knows (all of them on a cluster, from
their heartbeats), so that a dashboard needs no ``sum()`` and nothing is
counted twice. The format is written here (a few lines) rather than with
``prometheus_client``, whose multi-process mode shares files between
processes of one host, where Enjent's workers already exchange their counts
over the bus.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["COUNTERS", "METRICS_CONTENT_TYPE", "WorkerSample", "render_metrics"]

#: The counters of one process (``server.stats``), all starting at 0.
COUNTERS = (
    "connections_accepted",
    "connections_refused",
    "handshakes_refused",
    "handshake_timeouts",
    "keepalive_timeouts",
    "protocol_errors",
    "slow_consumers_closed",
    "rate_limited",
    "tokens_expired",
    "address_limited",
    "handler_errors",
    "http_responses",
    "messages_received",
    "messages_sent",
    "bytes_received",
    "bytes_sent",
    "history_joins",
    "history_recovered",
    "history_lost",
    "history_replayed",
)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: server.stats key -> (metric, help, extra labels); every one a counter.
_SERVER_COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("connections_accepted", "handshakes_total", "WebSocket handshakes by outcome", "accepted"),
    ("handshakes_refused", "handshakes_total", "WebSocket handshakes by outcome", "refused"),
    ("handshake_timeouts", "handshakes_total", "WebSocket handshakes by outcome", "timeout"),
    (
        "connections_refused",
        "connections_refused_total",
        "connections refused unread at the open-file limit",
        "",
    ),
    ("http_responses", "http_responses_total", "plain HTTP answers (health, metrics, pages)", ""),
    ("messages_received", "messages_received_total", "WebSocket messages received", ""),
    ("messages_sent", "messages_sent_total", "WebSocket messages written to clients", ""),
    ("bytes_received", "bytes_received_total", "bytes read from WebSocket clients", ""),
    ("bytes_sent", "bytes_sent_total", "bytes of data frames written to clients", ""),
    ("slow_consumers_closed", "slow_consumers_closed_total", "clients closed (3008) as slow", ""),
    ("keepalive_timeouts", "keepalive_timeouts_total", "clients closed for a missing pong", ""),
    ("protocol_errors", "protocol_errors_total", "connections failed by a protocol error", ""),
    ("handler_errors", "handler_errors_total", "exceptions raised by handlers", ""),
    ("rate_limited", "rate_limited_total", "clients closed (3013) over max_message_rate", ""),
    ("tokens_expired", "tokens_expired_total", "clients closed (3005): their token expired", ""),
    ("address_limited", "address_limited_total", "handshakes refused (429) per address", ""),
    ("history_joins", "history_joins_total", "joins of rooms with history by outcome", "fresh"),
    (
        "history_recovered",
        "history_joins_total",
        "joins of rooms with history by outcome",
        "recovered",
    ),
    ("history_lost", "history_joins_total", "joins of rooms with history by outcome", "lost"),
    ("history_replayed", "history_replayed_total", "publications replayed to clients", ""),
)

#: history store figure -> (metric, kind, help).
_HISTORY_FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("rooms", "history_rooms", "gauge", "rooms whose history is kept"),
    ("messages", "history_messages", "gauge", "publications kept in history"),
    ("bytes", "history_bytes", "gauge", "bytes of publications kept in history"),
    ("appended", "history_appended_total", "counter", "publications given an offset"),
    ("evicted", "history_evicted_total", "counter", "publications evicted (size, TTL, bound)"),
    ("replays", "history_replays_total", "counter", "recoveries asked of the history"),
)

#: bus counter -> help; metric ``enjent_bus_<name>_total``.
_BUS_COUNTERS: tuple[tuple[str, str], ...] = (
    ("sent", "bus messages published"),
    ("heartbeats", "heartbeats published (one a second; part of sent)"),
    ("received", "bus messages received"),
    ("dropped", "bus messages dropped at a high-water mark"),
    ("rate_limited", "bus messages dropped over the publish rate limit"),
    ("gaps", "bus messages lost (sequence gaps seen by receivers)"),
    ("malformed", "malformed bus messages ignored"),
    ("undeliverable", "sends and closes for clients no longer connected to the owner"),
    ("late_peers", "times another worker's heartbeat was late (a mark, not a death)"),
    ("presence_failures", "parts of a presence answer that could not be published"),
    ("presence_refused", "presence queries refused or not answered over the rate limit"),
    ("slow_consumers", "NATS slow-consumer errors (messages dropped by the NATS client)"),
    ("disconnects", "disconnections from the NATS server"),
    ("reconnects", "reconnections to a NATS server"),
    ("connect_failures", "failed attempts to reach NATS while the worker serves without it"),
)


@dataclass
class WorkerSample:
    """One worker's figures: its clients, ``server.stats`` and bus counters."""

    worker: int
    clients: int
    stats: Mapping[str, Any] = field(default_factory=dict)
    bus: Mapping[str, Any] | None = None


def _number(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def render_metrics(
    samples: Iterable[WorkerSample], history: Mapping[str, Any] | None = None
) -> str:
    """The exposition text for these workers, per worker and summed, and the
    figures of the history store (one process's, or the embedded bus keeper's)."""
    workers = sorted(samples, key=lambda sample: sample.worker)
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, series: list[tuple[str, int]]) -> None:
        lines.append(f"# HELP enjent_{name} {help_text}")
        lines.append(f"# TYPE enjent_{name} {kind}")
        lines.extend(f"enjent_{name}{labels} {value}" for labels, value in series)

    def labels(worker: int | None, outcome: str) -> str:
        parts = [] if worker is None else [f'worker="{worker}"']
        if outcome:
            parts.append(f'outcome="{outcome}"')
        return "{" + ",".join(parts) + "}" if parts else ""

    def both(name: str, kind: str, help_text: str, rows: list[tuple[str, list[int]]]) -> None:
        per_worker = [
            (labels(sample.worker, outcome), values[index])
            for outcome, values in rows
            for index, sample in enumerate(workers)
        ]
        family(name, kind, help_text, per_worker)
        summed = [(labels(None, outcome), sum(values)) for outcome, values in rows]
        family(f"cluster_{name}", kind, f"{help_text}, summed over the workers", summed)

    both("workers", "gauge", "workers reporting", [("", [1 for _ in workers])])
    both("connections", "gauge", "open WebSocket connections", [("", [s.clients for s in workers])])
    grouped: dict[str, tuple[str, list[tuple[str, list[int]]]]] = {}
    for key, name, help_text, outcome in _SERVER_COUNTERS:
        values = [_number(sample.stats.get(key)) for sample in workers]
        grouped.setdefault(name, (help_text, []))[1].append((outcome, values))
    for name, (help_text, rows) in grouped.items():
        both(name, "counter", help_text, rows)
    if any(sample.bus is not None for sample in workers):
        for key, help_text in _BUS_COUNTERS:
            values = [_number((sample.bus or {}).get(key)) for sample in workers]
            both(f"bus_{key}_total", "counter", help_text, [("", values)])
    if history is not None:
        for key, name, kind, help_text in _HISTORY_FIGURES:
            family(name, kind, help_text, [("", _number(history.get(key)))])
    return "\n".join(lines) + "\n"
