"""The engine: no gRPC, no protobuf. Its public face is `engine.Engine`."""
