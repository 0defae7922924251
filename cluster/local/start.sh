#!/usr/bin/env bash
# A Ray cluster of several nodes on this machine: a head with no CPUs (it runs job drivers and the
# dashboard) plus WORKERS worker nodes of CPUS_PER_WORKER CPUs each. Token auth is on and the
# dashboard listens on 127.0.0.1 only. Everything lives under CLUSTER_DIR, which stop.sh uses to
# stop exactly these processes and nothing else.
#
#   cluster/local/start.sh                       # head + 2 workers of 1 CPU
#   WORKERS=1 CPUS_PER_WORKER=2 cluster/local/start.sh
#   orchestrator submit jobs/quickstart.yaml --address http://127.0.0.1:8265 --follow
#   cluster/local/stop.sh
set -euo pipefail
WORKERS=${WORKERS:-2}
CPUS_PER_WORKER=${CPUS_PER_WORKER:-1}
GCS_PORT=${GCS_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orchestrator-cluster}
export RAY_AUTH_MODE=token

mkdir -p "$CLUSTER_DIR"
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -f "$HOME/.ray/auth_token" ]; then
  ray get-auth-token --generate > /dev/null   # written to ~/.ray/auth_token, never printed
fi
ray start --head --port="$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus=0 \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --temp-dir="$CLUSTER_DIR" --disable-usage-stats > "$CLUSTER_DIR/head.log" 2>&1
for i in $(seq 1 "$WORKERS"); do
  ray start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS_PER_WORKER" \
    --disable-usage-stats > "$CLUSTER_DIR/worker-$i.log" 2>&1
done
echo "$CLUSTER_DIR" > "$CLUSTER_DIR/cluster_dir"
echo "Ray cluster up: head + $WORKERS worker node(s) x $CPUS_PER_WORKER CPU, token auth on"
echo "dashboard and Jobs API: http://127.0.0.1:$DASHBOARD_PORT (loopback only; from elsewhere use an SSH tunnel)"
echo "stop it with: CLUSTER_DIR=$CLUSTER_DIR cluster/local/stop.sh"
