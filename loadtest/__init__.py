"""Enjent's load generator: raw-protocol WebSocket clients, psutil measurements, reports.

Layer 5 of docs/architecture.md. The load generator (`python -m loadtest`: `cli`,
`scenarios`, `client`, `wire`, `measure`, `report`, `servers`) is a client of the
public wire protocol only and never imports `enjent`; three micro-benchmarks measure
its internals in-process and do import it: `parser_bench`, `room_bench`,
`deflate_memory`. Run `python -m loadtest --help` from the repository root.
"""
