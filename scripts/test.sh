#!/usr/bin/env bash
# Runs the whole test suite (unit, property, integration against real nats-server
# processes, Python interop), installing what is missing first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo test --workspace --locked "$@"
