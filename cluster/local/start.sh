#!/usr/bin/env bash
# A Ray cluster of several nodes on this machine: `orchestrator up` with WORKERS worker nodes of
# CPUS_PER_WORKER CPUs each and a head with no CPUs (it runs job drivers and the dashboard). Token auth
# is on (a token is generated into ~/.ray/auth_token when none is configured) and everything listens
# on 127.0.0.1 only. Everything lives under CLUSTER_DIR, which stop.sh (`orchestrator down`) uses to
# stop exactly these processes and nothing else.
#
#   cluster/local/start.sh                       # head + 2 workers of 1 CPU
#   WORKERS=1 CPUS_PER_WORKER=2 cluster/local/start.sh
#   orchestrator submit jobs/quickstart.yaml --address auto --follow   # or http://127.0.0.1:8265
#   cluster/local/stop.sh
set -euo pipefail
WORKERS=${WORKERS:-2}
CPUS_PER_WORKER=${CPUS_PER_WORKER:-1}
export ORCHESTRATOR_CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orchestrator-cluster}
exec python -m orchestrator.cli up --workers "$WORKERS" --cpus "$((WORKERS * CPUS_PER_WORKER))" \
  --port "${GCS_PORT:-6380}" --dashboard-port "${DASHBOARD_PORT:-8265}"
