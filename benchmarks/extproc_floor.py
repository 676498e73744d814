"""An ext_proc server that does nothing but name one endpoint: what Python's gRPC (grpcio's
asyncio server, as Strata's picker uses) costs a request behind Envoy, before any picking.
benchmarks/router.py runs it as one of the hop's setups.

    python benchmarks/extproc_floor.py --port P --endpoint IP:PORT

It answers as Strata's picker answers the same messages (FULL_DUPLEX_STREAMED body held
until its end, then the headers answer and the body handed back; response headers
continued), so the difference between the two is the picker's own work.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from google.protobuf.struct_pb2 import Struct

from strata.router.envoy_config import DESTINATION, METADATA_NAMESPACE
from strata.router.extproc import _body_chunk, _header


class NamesOneEndpoint(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def headers_answer(self, extra: list) -> ProcessingResponse:
        metadata = Struct()
        metadata.update({METADATA_NAMESPACE: {DESTINATION: self.endpoint}})
        mutation = HeaderMutation(set_headers=[_header(DESTINATION, self.endpoint), *extra])
        return ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(
            header_mutation=mutation, clear_route_cache=True)), dynamic_metadata=metadata)

    async def Process(self, requests: AsyncIterator[ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ProcessingResponse]:
        body = bytearray()
        async for request in requests:
            match request.WhichOneof("request"):
                case "request_headers" if request.request_headers.end_of_stream:
                    yield self.headers_answer([])
                case "request_body":
                    body += request.request_body.body
                    if request.request_body.end_of_stream:
                        yield self.headers_answer([_header("content-length", str(len(body)))])
                        yield _body_chunk("request_body", bytes(body), True)
                case "response_headers":
                    yield ProcessingResponse(response_headers=HeadersResponse())
                case "response_trailers":
                    yield ProcessingResponse(response_trailers=TrailersResponse())


async def serve(port: int, endpoint: str) -> None:
    server = grpc.aio.server()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
        NamesOneEndpoint(endpoint), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoint", required=True, help="IP:port every request goes to")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.endpoint))


if __name__ == "__main__":
    main()
