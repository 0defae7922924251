"""Data: the sources (builtin digits, generated images, image folders, Parquet, packed shards), splits,
decoding, transforms and augmentations, the seeded loaders, and `orchestrator pack`.

Owns: `splits` (Split, StreamedSplit, DataError), `readers` and `packed` (the sources), `sources`
(their registry and the steps they share), `shards` and `streaming` (packed shards' order and
streams), `decode`, `augment`, `transforms`, `loaders`, `pack`.
May import: `config`, `store`. Torch and torchvision, never Ray.
The builtin digits live beside this file as `digits.parquet` (see tools/make_digits.py).
"""
