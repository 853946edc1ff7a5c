"""What the server and the gateway share, shipped by both installs (gateway/pyproject.toml maps this folder into
the gateway's distribution, as it does omni_grpc.v1): only the standard library and the gateway's own
dependencies here, never torch, diffusers or the engine."""
