"""A container's probes (startup, readiness, liveness) as the kubelet runs them: an HTTP GET
answered 200-399, a gRPC health check answered SERVING, or a TCP connect, with the
manifest's period, timeout and thresholds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strata.kube.objects import container_port


@dataclass
class Probe:
    kind: str  # httpGet | grpc | tcpSocket
    port: int
    path: str = "/"
    service: str = ""  # the gRPC health service name
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1

    @classmethod
    def from_spec(cls, spec: dict, container: dict) -> Probe:
        kinds = [k for k in ("httpGet", "grpc", "tcpSocket") if k in spec]
        if len(kinds) != 1:
            raise ValueError(f"container {container['name']}: a probe of a kind not supported "
                             f"here ({sorted(spec)})")
        action = spec[kinds[0]]
        if action.get("scheme", "HTTP") != "HTTP" or "host" in action:
            raise ValueError(f"container {container['name']}: a probe over HTTPS or to another "
                             f"host is not supported here")
        port = action["port"]
        number = port if isinstance(port, int) else container_port(container, port)
        if number is None:
            raise ValueError(f"container {container['name']}: a probe on an undeclared port "
                             f"{port!r}")
        return cls(kinds[0], number, action.get("path", "/"), action.get("service", ""),
                   spec.get("initialDelaySeconds", 0), spec.get("periodSeconds", 10),
                   spec.get("timeoutSeconds", 1), spec.get("failureThreshold", 3),
                   spec.get("successThreshold", 1))

    @property
    def window(self) -> float:
        """How long the probe may fail before the kubelet acts (a startup probe: the longest
        a start may take)."""
        return self.initial_delay + self.period * self.failure_threshold

    async def check(self, ip: str, http: httpx.AsyncClient) -> bool:
        """One try. `http` is shared: a client's set-up (its TLS context) takes longer than
        a probe's usual 1 s timeout on a busy machine."""
        try:
            async with asyncio.timeout(self.timeout):
                if self.kind == "httpGet":
                    response = await http.get(f"http://{ip}:{self.port}{self.path}")
                    return 200 <= response.status_code < 400
                if self.kind == "grpc":
                    async with grpc.aio.insecure_channel(f"{ip}:{self.port}") as channel:
                        answer = await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(service=self.service))
                    return answer.status == health_pb2.HealthCheckResponse.SERVING
                _, writer = await asyncio.open_connection(ip, self.port)
                writer.close()
                return True
        except (TimeoutError, OSError, httpx.HTTPError, grpc.aio.AioRpcError):
            return False
