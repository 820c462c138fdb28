"""The options of one load-test invocation, gathered in one frozen object.

Layer 5 of docs/architecture.md. `cli.py` copies the command line into a `Config`; scenarios,
server control and reports read only this object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = ("connections", "echo", "fanout", "handshake")

#: Per-scenario default for --clients (for handshake: upgrades in flight at once).
DEFAULT_CLIENTS = {"connections": 8000, "echo": 50, "fanout": 1000, "handshake": 20}


@dataclass(frozen=True)
class Config:
    scenario: str
    servers: tuple[str, ...]
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    clients: int = 0
    repeat: int = 1
    #: Clients offer permessage-deflate; where agreed, echo and fanout send pre-compressed
    #: frames and count compressed ones without inflating them (one client checks).
    offer_deflate: bool = False
    #: Clients speak TLS (wss://) to servers given a throwaway certificate.
    tls: bool = False
    #: The certificate and key of `tls`, made when the run starts.
    tls_files: tuple[Path, Path] | None = None
    #: Message bodies for echo and fanout: "random" bytes (letters with --text) or
    #: "json", JSON-like text records (compress as real traffic does).
    content: str = "random"
    #: Extra arguments appended to the server's command line (`--server-arg`).
    server_args: tuple[str, ...] = ()
    #: Enjent's bus: zeromq, nats (a local nats-server started here) or nats:// URLs.
    bus: str = "zeromq"
    # connections
    rate: float = 2000.0
    concurrency: int = 100
    hold: float = 5.0
    measure: float = 5.0
    sample_interval: float = 0.5
    # echo
    sizes: tuple[int, ...] = (32, 1024, 16384)
    pipeline: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    messages: int = 0
    text: bool = False
    # fanout
    broadcasts: int = 100
    payload: int = 32
    round_timeout: float = 10.0
    #: Fan-out over TLS: every receiver decrypts (default: all but the sender and one
    #: checking client count records without decrypting them).
    decrypt_all: bool = False
    # handshake
    count: int = 2000
    # runtime
    timeout: float = 900.0
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    server_cpus: frozenset[int] | None = None
    client_cpus: frozenset[int] | None = None
    source_addresses: int = 0
    use_uvloop: bool = True
    seed: int = 6455
    quiet: bool = False
    json_path: Path | None = None
    chart_path: Path | None = None
    chart: bool = True
    argv: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, frozenset):
                data[key] = sorted(value)
            elif isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = [str(item) if isinstance(item, Path) else item for item in value]
        return data
