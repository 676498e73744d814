"""Headers that the router and the servers agree on."""

# P/D: the decode instance has its prompt computed by this prefiller (llm-d's name).
PREFILLER_HEADER = "x-prefiller-host-port"
# On the router's answers: the endpoint that served the request.
ENDPOINT_HEADER = "x-strata-endpoint"
# P/D fields (the prefiller header, kv_transfer_params) count only on requests that carry
# the deployment's shared secret here, when one is set (--kv-peer-token).
KV_PEER_TOKEN_HEADER = "x-strata-kv-peer-token"
