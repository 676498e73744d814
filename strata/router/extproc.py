"""The endpoint picker as Envoy's external processor (`strata route --ext-proc-port`): the
ext_proc gRPC protocol the Gateway API Inference Extension's endpoint picker (EPP) speaks.

Envoy opens one `Process` stream per HTTP request and sends its parts: the request headers,
the body, maybe trailers, then the same for the response. The answer to the request names
the chosen endpoint, best first with fallbacks after commas, twice with the same value (the
EPP protocol): in the header `x-gateway-destination-endpoint` and in the dynamic metadata
`envoy.lb` / `x-gateway-destination-endpoint`. Envoy's override_host load-balancing policy
reads the whole list from the metadata (envoy_config.py); an ORIGINAL_DST cluster that reads
the header takes a single address: serve it with max_endpoints=1. The data plane's subset
hint restricts the ranking, and the endpoint that served, if it was not the first, gets the
request's count (data_plane.py). For P/D the prefiller goes in
`x-prefiller-host-port`, llm-d's header for its decode sidecar, with the router's
`x-strata-kv-peer-token` when it has one; a client's own of either is removed. What the
router answers itself (400, 404, 429, 503) becomes an ImmediateResponse with the OpenAI
error body.

Request body modes. Envoy names them in `protocol_config` on a stream's first message (Envoy
1.34 on); without it, FULL_DUPLEX_STREAMED is assumed, the mode GIE's Envoy configuration
sets. The request headers themselves cannot tell.
- FULL_DUPLEX_STREAMED: Envoy holds the headers until their answer and streams the body as it
  arrives. The pick needs the whole body, so nothing is answered before the body ends (the
  last chunk's end_of_stream, or the request trailers); then the headers answer carries the
  endpoint, and the body goes back unchanged in streamed chunks, as Envoy requires here.
- BUFFERED: Envoy sends the body, whole in one message, only after the headers are answered,
  so they are answered at once; the body's answer carries the endpoint (Envoy still holds the
  headers) and leaves the body as it is.
Other modes cannot route on the body and the stream is refused. On the response side, each
message gets its continue answer (FULL_DUPLEX_STREAMED body chunks are handed back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    DESCRIPTOR,
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    StreamedBodyResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from strata.router.data_plane import in_subset, served_address, subset_hint
from strata.router.endpoints import Endpoint
from strata.router.envoy_config import DESTINATION, METADATA_NAMESPACE
from strata.router.prompt import RouteError
from strata.router.routing import PD_HEADERS, Decision, Router

SERVICE = DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
FULL_DUPLEX = ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = ProcessingMode.BUFFERED
CHUNK_BYTES = 62_000  # Envoy wants streamed body chunks under 64 KiB
MAX_MESSAGE_BYTES = 64 << 20  # a BUFFERED body arrives in one message


@dataclass
class Exchange:
    """One HTTP request's stream."""

    request_mode: int = FULL_DUPLEX
    response_mode: int = FULL_DUPLEX
    body: bytearray = field(default_factory=bytearray)
    headers: dict[str, str] = field(default_factory=dict)  # the request's (flow control)
    decision: Decision | None = None
    endpoint: Endpoint | None = None  # where it is counted: in flight until the stream ends
    subset: list[str] | None = None  # the data plane's subset hint: pick among these only


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router, max_endpoints: int | None = None) -> None:
        self.router = router
        self.max_endpoints = max_endpoints  # None: the whole ranking

    async def Process(self, requests: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        exchange = Exchange()
        try:
            async for reply in self.replies(exchange, requests, context):
                yield reply
        finally:
            if exchange.endpoint is not None:
                self.router.finished(exchange.endpoint, exchange.decision)

    async def replies(self, exchange: Exchange, requests: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        async for request in requests:
            if request.HasField("protocol_config"):
                config = request.protocol_config
                if config.request_body_mode not in (FULL_DUPLEX, BUFFERED):
                    mode = ProcessingMode.BodySendMode.Name(config.request_body_mode)
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                        f"request_body_mode {mode}: the endpoint picker needs "
                                        f"FULL_DUPLEX_STREAMED or BUFFERED")
                exchange.request_mode = config.request_body_mode
                exchange.response_mode = config.response_body_mode
            if exchange.subset is None:
                exchange.subset = subset_hint(request)
            for reply in await self.answer(exchange, request):
                yield reply
                if reply.HasField("immediate_response"):
                    return  # Envoy ignores the stream from here

    async def answer(self, exchange: Exchange, request: ProcessingRequest
                     ) -> list[ProcessingResponse]:
        match request.WhichOneof("request"):
            case "request_headers" if request.request_headers.end_of_stream:
                return [self.route_bodiless(exchange)]
            case "request_headers":
                exchange.headers = {h.key.lower(): (h.raw_value or h.value.encode()).decode(
                    errors="replace") for h in request.request_headers.headers.headers}
                if exchange.request_mode == BUFFERED:
                    return [ProcessingResponse(request_headers=HeadersResponse())]
                return []  # FULL_DUPLEX_STREAMED: answered once the body is in
            case "request_body":
                exchange.body += request.request_body.body
                # BUFFERED: the whole body, even without end_of_stream (trailers follow)
                if exchange.request_mode == BUFFERED or request.request_body.end_of_stream:
                    return await self.route(exchange, end_of_stream=True)
                return []
            case "request_trailers":
                trailers = ProcessingResponse(request_trailers=TrailersResponse())
                if exchange.request_mode == BUFFERED:
                    return [trailers]
                # FULL_DUPLEX_STREAMED: the trailers end a body whose last chunk had no
                # end_of_stream
                return [*await self.route(exchange, end_of_stream=False), trailers]
            case "response_headers":
                self.count_where_served(exchange, served_address(request))
                return [ProcessingResponse(response_headers=HeadersResponse())]
            case "response_body":
                body = request.response_body
                if exchange.response_mode == FULL_DUPLEX:  # must hand every chunk back
                    return [_body_chunk("response_body", body.body, body.end_of_stream)]
                return [ProcessingResponse(response_body=BodyResponse())]
            case "response_trailers":
                return [ProcessingResponse(response_trailers=TrailersResponse())]
        return []

    async def route(self, exchange: Exchange, end_of_stream: bool) -> list[ProcessingResponse]:
        body = bytes(exchange.body)
        try:
            decision = await self.router.admit(body, exchange.headers)
        except RouteError as error:
            return [immediate_response(error)]
        exchange.decision, exchange.endpoint = decision, decision.ranked[0]  # admit() routed
        ranked = in_subset(decision.ranked, exchange.subset)
        if not ranked:
            return [immediate_response(RouteError(503, "no ready endpoint of the gateway's "
                                                       "subset hint serves the request"))]
        if ranked[0] is not exchange.endpoint:
            self.move(exchange, ranked[0])
        common, metadata = self.destination(ranked, decision.prefiller)
        if exchange.request_mode == BUFFERED:  # the body stays as Envoy holds it
            return [ProcessingResponse(request_body=BodyResponse(response=common),
                                       dynamic_metadata=metadata)]
        common.header_mutation.set_headers.append(_header("content-length", str(len(body))))
        chunks = [body[i:i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)]
        return [ProcessingResponse(request_headers=HeadersResponse(response=common),
                                   dynamic_metadata=metadata),
                *(_body_chunk("request_body", chunk, end_of_stream and i == len(chunks) - 1)
                  for i, chunk in enumerate(chunks))]

    def move(self, exchange: Exchange, endpoint: Endpoint, failed: bool = False) -> None:
        """The request is counted at `endpoint` instead of where it was routed: the subset
        hint left that one out, or (failed) it refused the gateway's connection."""
        (self.router.failed if failed else self.router.finished)(exchange.endpoint,
                                                                 exchange.decision)
        exchange.endpoint = endpoint
        self.router.routed(exchange.decision, endpoint)

    def count_where_served(self, exchange: Exchange, served: str | None) -> None:
        """The gateway fell back down the ranking: the first endpoint refused."""
        if exchange.decision is None or served in (None, exchange.endpoint.host_port):
            return
        endpoint = next((e for e in self.router.pool.endpoints if e.host_port == served), None)
        if endpoint is not None:
            self.move(exchange, endpoint, failed=True)

    def route_bodiless(self, exchange: Exchange) -> ProcessingResponse:
        """A GET or another request without a body: the ready endpoint with the shortest
        queue, whatever it serves."""
        ranked = in_subset(sorted((e for e in self.router.pool.endpoints if e.healthy()),
                                  key=lambda e: e.queue()), exchange.subset)
        if not ranked:
            return immediate_response(RouteError(503, "no endpoint is ready"))
        common, metadata = self.destination(ranked, None)
        return ProcessingResponse(request_headers=HeadersResponse(response=common),
                                  dynamic_metadata=metadata)

    def destination(self, ranked: list[Endpoint], prefiller: Endpoint | None
                    ) -> tuple[CommonResponse, Struct]:
        value = ",".join(e.host_port for e in ranked[:self.max_endpoints])
        mutation = HeaderMutation(set_headers=[_header(DESTINATION, value)])
        pd = self.router.pd_headers(prefiller)
        for key in PD_HEADERS:  # the router's own, or none: a client's never pass
            if key in pd:
                mutation.set_headers.append(_header(key, pd[key]))
            else:
                mutation.remove_headers.append(key)
        metadata = Struct()
        metadata.update({METADATA_NAMESPACE: {DESTINATION: value}})
        # The route may match on the new header: Envoy must pick the route again.
        return CommonResponse(header_mutation=mutation, clear_route_cache=True), metadata


def immediate_response(error: RouteError) -> ProcessingResponse:
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=error.status),
        headers=HeaderMutation(set_headers=[_header("content-type", "application/json")]),
        body=orjson.dumps(error.body()),
        details=f"strata_router_{error.status}"))


def _header(key: str, value: str) -> HeaderValueOption:
    # raw_value: what Envoy reads since send_header_raw_value (and what GIE sets). The
    # default append action overwrites: a client's own header does not survive.
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()))


def _body_chunk(kind: str, chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
    streamed = StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream)
    common = CommonResponse(body_mutation=BodyMutation(streamed_response=streamed))
    return ProcessingResponse(**{kind: BodyResponse(response=common)})


async def serve_ext_proc(router: Router, host: str, port: int,
                         max_endpoints: int | None = None) -> grpc.aio.Server:
    """The started ext_proc server, with the gRPC health service that Envoy's cluster health
    check asks; the caller awaits server.wait_for_termination() or server.stop(grace).
    max_endpoints: how many of the ranking the answer names (None: all, best first)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(router, max_endpoints), server)
    checker = health.aio.HealthServicer()
    for service in ("", SERVICE):
        await checker.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server

