"""The gRPC layer: protobuf in and out, the engine called off the event loop, health, auth and drain."""
