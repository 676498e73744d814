"""Who a server trades KV blocks with, and whom it takes P/D fields from.

P/D fields (the header `x-prefiller-host-port` and the body's `kv_transfer_params`) make a
server contact another host or pin KV blocks, so a client must not choose them. As llm-d's
routing sidecar guards the same flow, they are honoured only toward trusted peers
(`--kv-peers`: hosts or CIDRs, any port) and, when a shared secret is set
(`--kv-peer-token`), only on requests that carry it, as the router and the decode side do.
With no peers listed, a request with P/D fields is refused.

Host names match listed names exactly and are never resolved here: a name that resolves
into a listed network would let DNS decide whom the server contacts.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass

from strata.openai_errors import APIError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_RANKS = 64  # tensor-parallel ranks a prefiller may name in remote_ranks
# host:port and nothing else: no scheme, path, query or user:password@.
_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                        r"[A-Za-z0-9])?)*")


def parse_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """An IP address, or a lower-cased DNS name; ValueError for anything else."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        if not _HOST_NAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not an IP address or host name") from None
        return host.lower()


def parse_host_port(value: str) -> tuple[str, int]:
    """`host:port` strictly; ValueError for a path, user info, a scheme or a bad port."""
    match = _HOST_PORT.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not host:port")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    parse_host(match["host"])
    return match["host"], port


@dataclass(frozen=True)
class KVPeers:
    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = frozenset()
    token: str | None = None

    @classmethod
    def parse(cls, specs: list[str], token: str | None = None) -> KVPeers:
        """From `--kv-peers` values, each a host, an IP or a CIDR, or several split by commas."""
        networks, names = [], set()
        for spec in (part.strip() for value in specs for part in value.split(",")):
            if not spec:
                continue
            try:
                networks.append(ipaddress.ip_network(spec, strict=False))
                continue
            except ValueError:
                host = parse_host(spec)  # ValueError for what is neither
            if isinstance(host, str):
                names.add(host)
            else:  # a bracketed IPv6 address
                networks.append(ipaddress.ip_network(host))
        return cls(tuple(networks), frozenset(names), token or None)

    @property
    def configured(self) -> bool:
        return bool(self.networks or self.names)

    def allows(self, host: str) -> bool:
        try:
            parsed = parse_host(host)
        except ValueError:
            return False
        if isinstance(parsed, str):
            return parsed in self.names
        return any(parsed in network for network in self.networks)

    def check_caller(self, given_token: str | None) -> None:
        """403 unless the request carries the shared secret (when one is set)."""
        if self.token is not None and not hmac.compare_digest(
                (given_token or "").encode(), self.token.encode()):
            raise APIError(403, "P/D fields (x-prefiller-host-port, kv_transfer_params) need "
                                "the KV peer token", "kv_transfer_params")

    def check_configured(self) -> None:
        if not self.configured:
            raise APIError(400, "P/D fields (x-prefiller-host-port, kv_transfer_params) are "
                                "refused: this server lists no --kv-peers",
                           "kv_transfer_params")

    def prefiller(self, value: str) -> str:
        """The prefiller header's host:port once checked; 400 if malformed or not a peer."""
        try:
            host, port = parse_host_port(value.strip())
        except ValueError as exc:
            raise APIError(400, f"x-prefiller-host-port: {exc}") from None
        if not self.allows(host):
            raise APIError(400, f"x-prefiller-host-port: {host} is not a KV peer of this "
                                "server (--kv-peers)")
        return f"{host}:{port}"

    def check_remote(self, params: dict) -> None:
        """A remote prefill's address (from a client or a prefiller's answer) must be a peer.
        ValueError otherwise."""
        if not params.get("do_remote_prefill"):
            return
        host, port = params.get("remote_host"), params.get("remote_port")
        if not isinstance(host, str) or not self.allows(host):
            raise ValueError(f"remote_host {host!r} is not a KV peer of this server "
                             "(--kv-peers)")
        _check_port(port, "remote_port")
        ranks = params.get("remote_ranks")
        if ranks is None:
            return
        if not isinstance(ranks, list) or not 0 < len(ranks) <= MAX_RANKS:
            raise ValueError(f"remote_ranks must list 1 to {MAX_RANKS} [host, port] pairs")
        for rank in ranks:
            if not isinstance(rank, list) or len(rank) != 2:
                raise ValueError(f"remote_ranks: {rank!r} is not a [host, port] pair")
            if not isinstance(rank[0], str) or not self.allows(rank[0]):
                raise ValueError(f"remote_ranks: {rank[0]!r} is not a KV peer of this server "
                                 "(--kv-peers)")
            _check_port(rank[1], "remote_ranks")


def _check_port(port, field: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{field}: {port!r} is not a port")
