"""`omni-grpc bench`: throughput and adapter costs, measured side by side against plain diffusers."""
