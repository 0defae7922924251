"""Ray Train's elastic scaling policy, with lost nodes left out at once.

Ray 2.60's `ElasticScalingPolicy` counts the workers a restart can have from its autoscaling coordinator's
reservation, which refreshes its view of the nodes every 20 s: right after a node is lost it still counts
that node, the restart asks for workers the cluster no longer has and waits out the worker group's start
timeout (60 s) before it asks again. `LiveNodesPolicy` drops the nodes the GCS says are dead from that
reservation (`ray.nodes()`), so the first restart asks for what is there. Growing back still waits for the
coordinator's next refresh and `ScalingConfig.elastic_resize_monitor_interval_s`.

Like failure_policy.py this uses a Ray internal (the policy class and the controller's `scaling_policy`
argument, handed over by `worker.Trainer`); where it is missing, `LiveNodesPolicy` is None and Ray's own
policy runs. Imports neither torch nor the training code (the controller unpickles it).
"""

from __future__ import annotations

try:   # Ray internals: see the module docstring
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
except ImportError:  # pragma: no cover - another Ray version
    ElasticScalingPolicy = None


def alive_only(reserved: dict | None, nodes: list[dict]) -> dict | None:
    """The reservation {node id: resources} without the nodes `ray.nodes()` reports dead."""
    if not reserved:
        return reserved
    alive = {node["NodeID"] for node in nodes if node.get("Alive")}
    return {node_id: resources for node_id, resources in reserved.items() if node_id in alive}


if ElasticScalingPolicy is not None:
    class LiveNodesPolicy(ElasticScalingPolicy):
        """ElasticScalingPolicy counting only the nodes that are alive now."""

        def _get_reserved_resources(self):
            import ray

            return alive_only(super()._get_reserved_resources(), ray.nodes())
else:  # pragma: no cover
    LiveNodesPolicy = None
