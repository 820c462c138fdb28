"""The per-address table (enjent/server/addresses.py), without sockets."""

from __future__ import annotations

import os

import pytest

from enjent import AddressLimits
from enjent.exceptions import WebSocketNegotiationError
from enjent.server.addresses import AddressTable


def test_ipv6_addresses_count_by_their_prefix() -> None:
    key = AddressTable.key
    assert key("2001:db8:1:2::5") == key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::"
    assert key("2001:db8:1:3::5") != key("2001:db8:1:2::5")
    assert key("2001:db8:1:2::5", 128) == "2001:db8:1:2::5"
    assert key("192.0.2.7") == "192.0.2.7"


def test_columns_add_up_for_the_host_and_a_new_process_starts_its_column_empty() -> None:
    shared = AddressTable.create(4)
    first, second = shared.for_slot(0), shared.for_slot(1)
    limits = AddressLimits(max_connections=3)
    for table in (first, second, first):
        table.connected(table.admit("198.51.100.1", limits))
    with pytest.raises(WebSocketNegotiationError) as refused:
        second.admit("198.51.100.1", limits)
    assert refused.value.status == 429
    assert ("Retry-After", "5") in refused.value.headers
    second.admit("198.51.100.2", limits)  # another address: not touched
    again = shared.for_slot(0)  # worker 0 restarted: its two connections are gone
    bucket = again.bucket("198.51.100.1")
    assert again.connections(bucket) == 1
    again.disconnected(bucket)  # never below zero in its own column
    assert again.connections(bucket) == 1


def test_handshakes_per_second_are_the_hosts() -> None:
    shared = AddressTable.create(2)
    first, second = shared.for_slot(0), shared.for_slot(1)
    limits = AddressLimits(max_handshakes_per_second=4)
    admitted = refused = 0
    for index in range(10):
        try:
            (first if index % 2 else second).admit("203.0.113.9", limits)
            admitted += 1
        except WebSocketNegotiationError:
            refused += 1
    assert admitted <= 8 and refused >= 2  # at most two windows in a fast loop


def test_the_table_is_shared_with_a_forked_child() -> None:
    shared = AddressTable.create(2)
    pid = os.fork()
    if pid == 0:  # the child: a worker's column
        child = shared.for_slot(1)
        child.connected(child.bucket("192.0.2.44"))
        os._exit(0)
    os.waitpid(pid, 0)
    parent = shared.for_slot(0)
    assert parent.connections(parent.bucket("192.0.2.44")) == 1


def test_limits_are_checked() -> None:
    for bad in ({"max_connections": 0}, {"max_handshakes_per_second": -1}, {"ipv6_prefix": 0}):
        with pytest.raises(ValueError):
            AddressLimits(**bad)  # type: ignore[arg-type]
