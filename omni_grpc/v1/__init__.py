"""The generated code of the omni_grpc.v1 contract (scripts/gen_protos.py writes it; never edit it), and
the one name derived from it."""

from omni_grpc.v1 import omni_pb2 as _omni_pb2

# The full name of the service, as gRPC routes and health checks spell it ("omni_grpc.v1.OmniService").
SERVICE_NAME: str = _omni_pb2.DESCRIPTOR.services_by_name["OmniService"].full_name
