#!/usr/bin/env bash
# Quick start: installs what is missing, builds, and runs `flotilla demo` on an
# embedded nats-server with the simulated LLM. Extra arguments go to `flotilla demo`
# (e.g. --sessions 200 --llm-latency-ms 500).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --locked -p flotilla-cli
exec ./target/release/flotilla demo "$@"
