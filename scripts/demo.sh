#!/usr/bin/env bash
# The flows demo: a two-node lab cluster from the seed scenario (frontend, backend, db,
# kube-system), a node-probe on each node, real traffic, and the flows the kernel saw.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --bins
flows=target/debug/flows
$flows lab down >/dev/null 2>&1 || true
trap '$flows lab down' EXIT
$flows lab up lab/examples/seed --nodes 2 --probes
echo
echo "== traffic: lab/scenarios/seed-traffic.yaml"
$flows lab drive lab/scenarios/seed-traffic.yaml -o table
echo
echo "== flows seen by the node-probes (flows observe --all)"
servers=$($flows lab status -o json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join("--server "+d["addr"] for d in s.get("probes", [])))')
# shellcheck disable=SC2086
$flows observe $servers --all --print-node-name
