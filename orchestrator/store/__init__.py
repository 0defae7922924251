"""The run folder and what is kept in it: storage on any filesystem pyarrow opens, the one-writer lock,
the metric row, and listing runs and sweeps.

Owns: `storage` (the layout, atomic writes), `runlock`, `metrics` (a row's columns, the best epoch),
`runs` (reading run and sweep folders back).
May import: `config`. No torch, no Ray.
"""
