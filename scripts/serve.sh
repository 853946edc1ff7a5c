#!/usr/bin/env bash
# Start the gRPC server and the REST gateway in front of it. With no --model the server runs the embedded
# small default model. Flags go to `omni-grpc serve`, e.g. --model /models/sd35 --lora-path style=/loras/style.
# Environment: OMNI_GRPC_PORT (default 50051), OMNI_GATEWAY_HOST (127.0.0.1), OMNI_GATEWAY_PORT (8091),
# OMNI_GATEWAY_FLAGS (extra `omni-grpc gateway` flags, e.g. --enable-lora-admin), OMNI_LORA_DIRS (folders,
# colon-separated, that requests may load adapters from by path; default ./loras of this checkout).
# SIGTERM/SIGINT stop both gracefully; if either exits, the other is stopped too.
source "$(dirname "$0")/setup.sh"
grpc_port="${OMNI_GRPC_PORT:-50051}"
lora_flags=()
IFS=':' read -r -a lora_dirs <<< "${OMNI_LORA_DIRS:-$ROOT/loras}"
for dir in "${lora_dirs[@]}"; do
  mkdir -p "$dir"
  lora_flags+=(--lora-dirs "$dir")
done
# On the embedded default model, a first adapter for the README's commands at <first lora dir>/lora_adapter
# (written once; whatever is there is left alone).
omni-grpc serve --port "$grpc_port" "${lora_flags[@]}" --example-adapter "${lora_dirs[0]}/lora_adapter" "$@" &
server=$!
# shellcheck disable=SC2086  # OMNI_GATEWAY_FLAGS is a list of flags
omni-grpc gateway --host "${OMNI_GATEWAY_HOST:-127.0.0.1}" --port "${OMNI_GATEWAY_PORT:-8091}" \
  --grpc-target "127.0.0.1:${grpc_port}" ${OMNI_GATEWAY_FLAGS:-} &
gateway=$!
stop() { kill -TERM "$server" "$gateway" 2>/dev/null || true; }
trap stop TERM INT
set +e
wait -n "$server" "$gateway"
status=$?
stop
wait "$server"; server_status=$?
wait "$gateway"; gateway_status=$?
# A signal-initiated stop ends 0 when both drained cleanly; otherwise report the first failure.
if [ "$status" -ge 128 ]; then
  status=$(( server_status != 0 ? server_status : gateway_status ))
fi
exit "$status"
