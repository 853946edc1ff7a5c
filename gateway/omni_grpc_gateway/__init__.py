"""The REST gateway of omni-grpc: OpenAI-style HTTP/JSON in front of the gRPC service.

It is a separate process that knows nothing of torch or of the engine: every route turns its JSON body
into a call of the generated async gRPC stub (`omni_grpc.v1`) and the reply back into JSON.
Entry points: `gateway.app.create_app(GatewaySettings(...))`, or `omni-grpc gateway` on the command line.
"""
