#!/usr/bin/env bash
# Stop the cluster cluster/local/start.sh started (`orchestrator down`): only processes whose command
# line names its CLUSTER_DIR sessions (gcs_server, raylets, dashboard, ...); their Ray workers exit
# with them. Unlike `ray stop`, other Ray instances on this machine are left alone.
set -euo pipefail
export ORCHESTRATOR_CLUSTER_DIR=${CLUSTER_DIR:-/tmp/orchestrator-cluster}
exec python -m orchestrator.cli down
