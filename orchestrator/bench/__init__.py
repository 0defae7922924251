"""Benchmarks, apart from the product: each prints its figures as ratios to a baseline measured in the
same run (`orchestrator bench overhead | reliability | sweep`). They read run folders through
`storage.py`'s names, like the product does."""
