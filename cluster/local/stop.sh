#!/usr/bin/env bash
# Stop the cluster cluster/local/start.sh started: only processes whose command line names its
# CLUSTER_DIR session (gcs_server, raylets, dashboard, ...); their Ray workers exit with them.
# Unlike `ray stop`, other Ray instances on this machine are left alone.
set -uo pipefail
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orchestrator-cluster}
pattern="$CLUSTER_DIR/session_"
pkill -TERM -f "$pattern" || { echo "no cluster running under $CLUSTER_DIR"; exit 0; }
for _ in $(seq 1 20); do
  pgrep -f "$pattern" > /dev/null || { echo "stopped the cluster under $CLUSTER_DIR"; exit 0; }
  sleep 0.5
done
pkill -KILL -f "$pattern"
echo "stopped the cluster under $CLUSTER_DIR (some processes needed SIGKILL)"
