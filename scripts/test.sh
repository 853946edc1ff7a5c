#!/usr/bin/env bash
# Install what is needed, then run every check CI runs: buf lint + format, ruff, mypy, the test suite.
source "$(dirname "$0")/setup.sh"
BUF_VERSION=1.75.0
if [ ! -x .tools/node_modules/.bin/buf ]; then
  npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@${BUF_VERSION}"
fi
echo "== buf lint / format"
.tools/node_modules/.bin/buf lint
.tools/node_modules/.bin/buf format --diff --exit-code
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
export HF_HUB_OFFLINE=1
python -m pytest "$@"
