"""The Ray glue, kept thin: starting or joining Ray, a local cluster (`up`/`down`), a spec + plan into a
TorchTrainer (`launch`, `worker`), which failures are retried (`failure_policy`), Ray Data ingest,
sweeps with Ray Tune, and jobs submitted to a cluster.

May import: everything below it (`config`, `store`, `data`, `train`, `after`).
"""
