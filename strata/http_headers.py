"""Headers that the router and the servers agree on."""

# P/D: the decode instance has its prompt computed by this prefiller (llm-d's name).
PREFILLER_HEADER = "x-prefiller-host-port"
# On the router's answers: the endpoint that served the request.
ENDPOINT_HEADER = "x-strata-endpoint"
