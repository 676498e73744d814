"""The live dashboard of `strata serve` and `strata route`: one JSON snapshot endpoint, the
same snapshots streamed as server-sent events, and a self-contained page that draws them."""
