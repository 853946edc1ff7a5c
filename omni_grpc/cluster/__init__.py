"""omni-grpc on a Ray Serve cluster (`omni-grpc cluster`): an ingress on Serve's gRPC proxy that routes each
request to a replica holding its adapter, replicas that each run today's engine, and a registry actor for the
admin RPCs. Needs the `cluster` extra (ray[serve]); nothing outside this package imports Ray."""
