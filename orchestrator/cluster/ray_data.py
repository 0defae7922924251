"""`data.loader: ray_data`: training images read and decoded by Ray Data, not by DataLoader workers.

The train split's shards are read with `read_parquet`, their blocks shuffled, then decoded and
augmented in `map_batches` tasks (CPU only: they can run on CPU-only nodes, so GPU nodes do not
decode), and Ray Train's DataConfig hands each worker an equal share through
`streaming_split(world, equal=True)`. A worker takes exactly the plan's micro-batches from its share
(the global-batch contract holds; the rows left over an epoch are dropped, as with `torch`).

Limits, stated: the order is not a function of (seed, epoch) (blocks reach the workers as tasks
finish; augmentation draws are not seeded), so runs do not repeat bitwise and a mid-epoch resume is
refused (`run.checkpoint_every_steps` needs `data.loader: torch`); an epoch resume works. It needs
a pack with its own val split (a held-out share of train row groups would leak into whole-file reads).
Validation and test stream through the torch path.
"""

from __future__ import annotations

DECODE_BATCH = 32
"""images per map_batches call"""
SHUFFLE_BUFFER_ROWS = 1024
"""rows of the local shuffle buffer in each worker's iterator"""

_transforms: dict = {}


def decode_batch(batch: dict, data: dict) -> dict:
    """map_batches: {"image": encoded bytes, "label"} -> {"image": (N, 3, H, W) uint8 (the loop normalises it; float32
    normalised when an augmentation needs floats), "label"}."""
    import numpy as np
    import torch

    from orchestrator.config.spec import DataSpec
    from orchestrator.data.decode import decode_image
    from orchestrator.data.transforms import build_transform, delivers_uint8

    key = repr(sorted(data.items()))
    if key not in _transforms:
        torch.set_num_threads(1)
        spec = DataSpec.model_validate(data)
        _transforms[key] = build_transform(spec, True, pre_sized=False, uint8_out=delivers_uint8(spec))
    transform = _transforms[key]
    upright = data.get("exif_transpose", True)
    images = [transform(decode_image(blob, "a packed shard (Ray Data)", upright)) for blob in batch["image"]]
    return {"image": torch.stack(images).numpy(), "label": np.asarray(batch["label"], dtype=np.int64)}


def train_dataset(data_spec, split):
    """The Ray Dataset of a ShardSplit: read, block order shuffled, decoded and augmented."""
    import ray.data

    from orchestrator.data.shards import read_manifest
    from orchestrator.data.splits import DataError

    if not read_manifest(split.uri).splits.get("val"):
        raise DataError(f"data.loader: ray_data needs a pack with a val split ({split.uri} has none: pack a tree with val/)")
    files = sorted({f"{split.uri}/{unit.file}" for unit in split.units})
    dataset = ray.data.read_parquet(files, columns=["image", "label"])
    return dataset.randomize_block_order().map_batches(
        decode_batch, fn_kwargs={"data": data_spec.model_dump(mode="json")}, batch_size=DECODE_BATCH,
        batch_format="numpy", num_cpus=1)


def epoch_batches(batch_size: int, seed: int):
    """In a Ray Train worker: epoch -> an iterable of (images, labels) from this worker's share."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int):
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                              local_shuffle_seed=seed * 1_000 + epoch):
            yield batch["image"], batch["label"]

    return batches
