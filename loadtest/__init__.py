"""Enjent's load generator: raw-protocol WebSocket clients, psutil measurements, reports.

Layer 5 of docs/architecture.md: a client of the public wire protocol only, it never imports
`enjent`. Run `python -m loadtest --help` from the repository root.
"""
