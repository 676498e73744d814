"""Trust boundaries of `strata serve`: no client field or header makes it contact an address
the operator did not list, pin KV blocks, or learn its internal addresses (the P/D trust
rules, unit-tested here, and live against a default server)."""

from __future__ import annotations

import httpx
import pytest

from strata.openai_errors import APIError
from strata.server.kv_peers import KVPeers, parse_host_port
from tests.listener import Listener
from tests.test_server_errors import assert_openai_error


@pytest.mark.parametrize("value", [
    "127.0.0.1:8000/v1/completions", "user:pw@127.0.0.1:8000", "http://127.0.0.1:8000",
    "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:80?x=1", "127.0.0.1:80#x",
    " 127.0.0.1:80", "[::1:80", "a..b:80", "-a:80", "127.0.0.1:8000\r\nx: y"])
def test_host_port_is_parsed_strictly(value):
    with pytest.raises(ValueError):
        parse_host_port(value)


def test_host_port_accepts_addresses_and_names():
    assert parse_host_port("10.1.2.3:8000") == ("10.1.2.3", 8000)
    assert parse_host_port("[fd00::1]:8000") == ("[fd00::1]", 8000)
    assert parse_host_port("prefill-0.prefill.ns.svc:8000") == ("prefill-0.prefill.ns.svc", 8000)


def test_peers_match_networks_and_exact_names_only():
    peers = KVPeers.parse(["10.0.0.0/8,127.0.0.1", "prefill.ns.svc", "[fd00::1]"])
    assert peers.allows("10.200.0.7") and peers.allows("127.0.0.1")
    assert peers.allows("fd00::1") and peers.allows("[fd00::1]")
    assert peers.allows("PREFILL.ns.svc")
    assert not peers.allows("127.0.0.2") and not peers.allows("192.168.0.1")
    assert not peers.allows("evil.prefill.ns.svc")  # names are never resolved or suffixed
    assert not peers.allows("localhost")
    assert not KVPeers.parse([]).configured
    with pytest.raises(ValueError):
        KVPeers.parse(["not a host"])


def test_the_peer_token_is_checked_when_set():
    KVPeers.parse(["127.0.0.1"]).check_caller(None)  # no token set: trust by network
    peers = KVPeers.parse(["127.0.0.1"], token="t0ken")
    peers.check_caller("t0ken")
    for given in (None, "", "t0ke", "t0ken "):
        with pytest.raises(APIError) as refused:
            peers.check_caller(given)
        assert refused.value.status == 403


def test_a_remote_prefill_must_name_a_peer():
    peers = KVPeers.parse(["127.0.0.1"])
    peers.check_remote({"do_remote_decode": True})
    peers.check_remote({"do_remote_prefill": True, "remote_host": "127.0.0.1",
                        "remote_port": 5557})
    for host, port in [("127.0.0.2", 5557), ("127.0.0.1:5557", 5557), (None, 5557),
                       ("127.0.0.1", "5557"), ("127.0.0.1", 0), ("127.0.0.1", True)]:
        with pytest.raises(ValueError):
            peers.check_remote({"do_remote_prefill": True, "remote_host": host,
                                "remote_port": port})
    # A tensor-parallel prefiller names every rank: each must be a peer too.
    base = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 5557}
    peers.check_remote(base | {"remote_ranks": [["127.0.0.1", 5557], ["127.0.0.1", 5558]]})
    for ranks in ([["127.0.0.1", 5557], ["127.0.0.2", 5558]], [["127.0.0.1", 0]], [],
                  [["127.0.0.1"]], "127.0.0.1:5557", [["127.0.0.1", 5557]] * 65):
        with pytest.raises(ValueError):
            peers.check_remote(base | {"remote_ranks": ranks})


@pytest.fixture()
def listener():
    with Listener() as listening:
        yield listening


def test_a_default_server_contacts_nothing_a_client_names(strata_server, listener):
    """No connector, no --kv-peers: every P/D field is a 400, and nothing leaves the server."""
    url = f"{strata_server.url}/v1/completions"
    body = {"prompt": [1, 2, 3], "max_tokens": 2}
    remote = {"do_remote_prefill": True, "remote_engine_id": "x", "remote_host": "127.0.0.1",
              "remote_port": listener.port, "remote_block_ids": [0, 1]}
    for header in (listener.address, f"{listener.address}/steal", f"u:p@{listener.address}"):
        assert_openai_error(httpx.post(url, json=body, headers={
            "x-prefiller-host-port": header}, timeout=30), 400)
    for params in (remote, {"do_remote_decode": True}):
        error = assert_openai_error(httpx.post(url, json=body | {"kv_transfer_params": params},
                                               timeout=30), 400)
        assert error["param"] == "kv_transfer_params"
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "kv_transfer_params": remote}
    assert_openai_error(httpx.post(f"{strata_server.url}/v1/chat/completions", json=chat,
                                   timeout=30), 400)
    assert listener.connections == []
    ok = httpx.post(url, json=body | {"kv_transfer_params": None}, timeout=30)
    assert ok.status_code == 200 and "kv_transfer_params" not in ok.json()

