#!/usr/bin/env bash
# Start the gRPC server. With no --model it serves the embedded small default model.
# Any flag of `omni-grpc serve` may follow, e.g. --model /models/sd35 --lora-path style=/loras/style.
source "$(dirname "$0")/setup.sh"
exec omni-grpc serve "$@"
