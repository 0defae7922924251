"""Run by test_resilience in its own process: a simulated multi-node cluster on this machine.

A head with 0 CPUs and two nodes of 1 CPU each (`ray.cluster_utils.Cluster`); the job asks for
STRICT_SPREAD, so each of the 2 workers must land on its own node. Usage: multinode_check.py JOB
"""

import sys

import ray
from ray.cluster_utils import Cluster

from orchestrator.cli import main

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
try:
    code = main(["train", sys.argv[1], "--set", "scaling.placement_strategy=STRICT_SPREAD"])
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
