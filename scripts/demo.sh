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
$flows lab up lab/examples/seed lab/examples/intruder --nodes 2 --probes
echo
echo "== traffic: lab/scenarios/seed-traffic.yaml"
$flows lab drive lab/scenarios/seed-traffic.yaml -o table
echo
echo "== flows seen by the node-probes, merged by the relay (flows observe --all)"
servers=$($flows lab status -o json | python3 -c 'import json,sys; s=json.load(sys.stdin); print(" ".join("--server "+d["addr"] for d in s.get("probes", [])))')
# shellcheck disable=SC2086
$flows observe $servers --all --print-node-name

echo
echo "== the seed guide's NetworkPolicies, enforced (lab/examples/seed-policies)"
$flows lab policy apply lab/examples/seed-policies
sleep 2
$flows lab drive lab/scenarios/seed-traffic-policies.yaml -o table
echo
echo "== denied by policy, with the policies that decided"
$flows observe --last 400 -o json | python3 -c '
import json, sys
def name(e):
    return e["namespace"] + "/" + e["pod_name"] if e.get("pod_name") else "world"
for line in sys.stdin:
    f = json.loads(line).get("flow")
    if not f or f.get("drop_reason") != "POLICY_DENIED":
        continue
    pols = [p["namespace"] + "/" + p["name"] for p in f.get("egress_denied_by", []) + f.get("ingress_denied_by", [])]
    print("%s: %s -> %s %s: DROPPED by %s" % (f["node_name"], name(f.get("source", {})),
          name(f.get("destination", {})), f["ip"]["destination"], ", ".join(pols)))
'

echo
echo "== the audit from the relay's embedded ClickHouse store (flows audit --since 5m)"
sleep 2
$flows audit --since 5m

echo
echo "== policy advice: the seed traffic with no policies, then least-privilege policies from it"
$flows lab policy delete --all
sleep 2
start=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
$flows lab drive lab/scenarios/seed-traffic.yaml -o table | tail -1
sleep 3
suggested=$(mktemp --suffix=.yaml)
$flows policy suggest --since "$start" --explain | tee "$suggested"
$flows lab policy apply "$suggested"
sleep 2
echo
echo "== the same traffic under the suggested policies (nothing is dropped by policy)"
$flows lab drive lab/scenarios/seed-traffic.yaml -o table | tail -11
echo
echo "== an intruder in the frontend namespace tries lateral moves (lab/scenarios/intruder.yaml)"
since=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
$flows lab drive lab/scenarios/intruder.yaml -o table | tail -9
sleep 2
$flows observe --since "$since" --verdict drop
echo
echo "== what-if: the seed guide's policies instead, against the first window"
$flows policy check lab/examples/seed-policies --replace --since "$start" --until "$since" || true
rm -f "$suggested"
