"""Data sources, splits and loaders, on files the tests make."""

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config.plan import make_plan
from orchestrator.config.spec import DataSpec, JobSpec
from orchestrator.data.decode import ImageReadError
from orchestrator.data.loaders import make_dataset, train_loader
from orchestrator.data.sources import load_splits
from orchestrator.data.splits import DataError, stratified_split
from orchestrator.data.transforms import build_transform


def make_folder(root, classes=("cat", "dog"), per_class=6, size=12, splits=("train",)):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_builtin_digits_with_class_subset_and_few_shot():
    splits = load_splits(DataSpec(classes=[5, 6, 7, 8, 9], max_per_class=25), seed=0)
    assert splits.class_names == ["5", "6", "7", "8", "9"]
    assert len(splits.train) == 125 and np.bincount(splits.train.labels).tolist() == [25] * 5
    assert len(splits.test) == 179                       # the fixed 20% test split of digits 5-9
    assert set(splits.val.labels.tolist()) == {0, 1, 2, 3, 4}
    again = load_splits(DataSpec(classes=[5, 6, 7, 8, 9], max_per_class=25), seed=0)
    assert np.array_equal(again.train.items, splits.train.items)   # seeded: the same few shots
    other = load_splits(DataSpec(classes=[5, 6, 7, 8, 9], max_per_class=25), seed=1)
    assert not np.array_equal(other.train.items, splits.train.items)


def test_all_digits_counts():
    splits = load_splits(DataSpec(), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 359


def test_stratified_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    keep, held = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held]).tolist() == [2, 4, 6]
    assert len(set(keep) & set(held)) == 0 and len(keep) + len(held) == 60
    assert np.array_equal(held, stratified_split(labels, 0.2, seed=0)[1])


def test_imagefolder_with_train_val_test(tmp_path):
    make_folder(tmp_path, splits=("train", "val", "test"))
    splits = load_splits(DataSpec(source=f"imagefolder:{tmp_path}", image_size=16), seed=0)
    assert splits.class_names == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 12, 12)
    data = DataSpec(image_size=16, augment=["random_resized_crop", "hflip"])
    image, label = make_dataset(splits.train, data, True, "train")[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8       # the training loop normalises it
    assert make_dataset(splits.val, data, False, "val")[0][0].dtype == torch.float32
    noisy = DataSpec(image_size=16, augment=["gaussian_noise"])             # float augmentations: normalised in the loader
    assert make_dataset(splits.train, noisy, True, "train")[0][0].dtype == torch.float32


def test_normalising_a_uint8_batch_equals_the_per_image_transform():
    from orchestrator.data.transforms import build_transform, normalize_batch

    data = DataSpec(image_size=8, augment=["hflip"])
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    full = build_transform(data, False, pre_sized=True)
    assert torch.equal(normalize_batch(images, data.mean, data.std), torch.stack([full(i) for i in images]))


def test_imagefolder_without_val_or_test_says_so(tmp_path):
    make_folder(tmp_path, per_class=10)
    splits = load_splits(DataSpec(source=f"imagefolder:{tmp_path}", val_fraction=0.2), seed=0)
    assert (len(splits.train), len(splits.val), splits.test) == (16, 4, None)
    assert any("no val split" in n for n in splits.notes) and any("no test split" in n for n in splits.notes)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        load_splits(DataSpec(source=f"imagefolder:{tmp_path / 'nope'}"), seed=0)


def test_an_image_damaged_after_the_check_is_reported_with_its_path(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "1.png"
    spec = DataSpec(source=f"imagefolder:{tmp_path}", val_fraction=0.0)
    splits = load_splits(spec, seed=0)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")       # overwritten while the run goes
    dataset = make_dataset(splits.train, spec, True, "train")
    index = splits.train.items.index(str(bad))
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}"):
        dataset[index]


def test_parquet_source(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs, labels, split = [], [], []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), i * 10, dtype=np.uint8)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
        labels.append("ant" if i % 2 else "bee")
        split.append("test" if i >= 10 else "train")
    pq.write_table(pa.table({"image": blobs, "label": labels, "split": split}), tmp_path / "d.parquet")
    spec = DataSpec(source=f"parquet:{tmp_path / 'd.parquet'}", image_size=8, val_fraction=0.25)
    splits = load_splits(spec, seed=0)
    assert splits.class_names == ["ant", "bee"] and len(splits.test) == 2 and len(splits.train) + len(splits.val) == 10
    image, label = make_dataset(splits.test, spec, False, "test")[0]
    assert image.shape == (3, 8, 8)


def test_synthetic_source():
    spec = DataSpec(source="synthetic", image_size=16)
    splits = load_splits(spec, seed=0)
    assert splits.num_classes == 10 and len(splits.train) == 512 and splits.train.items.shape == (512, 16, 16, 3)


def test_every_augmentation_runs_on_uint8_images():
    spec = DataSpec(image_size=16, augment=["hflip", "vflip", "rotate90", "color_jitter", "random_resized_crop", "blur", "gaussian_noise"])
    out = build_transform(spec, train=True, pre_sized=False)(torch.randint(0, 255, (3, 20, 24), dtype=torch.uint8))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert "RandomRotate90()" in repr(build_transform(spec, True, False))


def test_loader_shards_are_disjoint_and_reshuffle_each_epoch():
    spec = JobSpec.model_validate({"data": {"classes": [0, 1, 2]}})
    splits = load_splits(spec.data, 0)
    dataset = make_dataset(splits.train, spec.data, False, "train")
    plan = make_plan(spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"per_worker_batch_size": 8})}),
                     len(dataset), world_size=2)
    loaders = [train_loader(dataset, spec.data, plan, rank, seed=0) for rank in range(2)]
    assert len(loaders[0]) == len(dataset) // 16
    orders = []
    for epoch in range(2):
        shards = []
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
            shards.append(list(loader.sampler))
        assert not set(shards[0]) & set(shards[1])
        orders.append(shards[0])
    assert orders[0] != orders[1]


def test_global_batches_do_not_depend_on_the_world_size():
    from orchestrator.data.loaders import GlobalBatchSampler

    def per_step(world: int, batch: int, accum: int) -> list[set]:
        shards = [list(GlobalBatchSampler(103, batch, world, rank, accum, seed=5)) for rank in range(world)]
        micro = [[shard[i:i + batch] for i in range(0, len(shard), batch)] for shard in shards]
        steps = len(micro[0]) // accum
        return [set().union(*(micro[r][s * accum + a] for r in range(world) for a in range(accum))) for s in range(steps)]

    one = per_step(world=1, batch=8, accum=1)
    assert len(one) == 103 // 8 and all(len(b) == 8 for b in one)
    assert per_step(world=2, batch=4, accum=1) == one
    assert per_step(world=2, batch=2, accum=2) == one
    assert per_step(world=4, batch=1, accum=2) == one
