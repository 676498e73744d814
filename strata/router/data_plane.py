"""What the data plane (Envoy) tells the endpoint picker in its ext_proc messages, as the
Gateway API Inference Extension's endpoint-picker protocol defines it:

- the subset hint: filter metadata `envoy.lb.subset_hint` /
  `x-gateway-destination-endpoint-subset`, a list of IP:port (or one comma-separated
  string, as a header copied into metadata gives it), that the picker must pick among;
- the endpoint that served the request, on the response: GIE's metadata `envoy.lb` /
  `x-gateway-destination-endpoint-served`, or Envoy's `upstream.address` attribute (what
  Strata's Envoy configuration asks for: stock Envoy does not set GIE's key)."""

from __future__ import annotations

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from strata.router.endpoints import Endpoint
from strata.router.envoy_config import METADATA_NAMESPACE, SUBSET_NAMESPACE

SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_KEY = "x-gateway-destination-endpoint-served"
UPSTREAM_ADDRESS = "upstream.address"


def subset_hint(request: ProcessingRequest) -> list[str] | None:
    """The IP:ports the request may go to; None: no hint (any endpoint of the pool)."""
    hint = request.metadata_context.filter_metadata.get(SUBSET_NAMESPACE)
    if hint is None or SUBSET_KEY not in hint.fields:
        return None
    value = hint.fields[SUBSET_KEY]
    items = value.list_value.values if value.HasField("list_value") else [value]
    return [address.strip() for item in items if item.HasField("string_value")
            for address in item.string_value.split(",") if address.strip()]


def in_subset(ranked: list[Endpoint], subset: list[str] | None) -> list[Endpoint]:
    """The ranking restricted to the subset, best first."""
    if subset is None:
        return ranked
    return [e for e in ranked if e.host_port in subset]


def served_address(request: ProcessingRequest) -> str | None:
    """IP:port of the endpoint that answered, if the data plane says."""
    sources = [(request.metadata_context.filter_metadata.get(METADATA_NAMESPACE), SERVED_KEY),
               # attributes are keyed by the ext_proc filter's name
               *((attributes, UPSTREAM_ADDRESS) for attributes in request.attributes.values())]
    for struct, key in sources:
        if struct is not None and key in struct.fields and struct.fields[key].string_value:
            return struct.fields[key].string_value
    return None
