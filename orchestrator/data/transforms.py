"""The transforms of a run: training augmentations in the order written, then resize, scale and normalise.

Images are uint8 CHW tensors; in-memory sources are resized once up front (`resize_array`).
Training batches may leave the loader as uint8 and be normalised by the loop on its device
(`delivers_uint8`, `normalize_batch`); `eval_transform` is what `predict` applies to a file.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from orchestrator.config.catalog import FLOAT_ONLY_AUGMENTATIONS, augmentation_entry
from orchestrator.config.spec import DataSpec
from orchestrator.data.augment import AUGMENTATIONS


def eval_transform(image_size: int, mean, std, resize: int | None = None) -> v2.Compose:
    """The evaluation transform of a run, from its data keys alone (what `predict` applies to a file):
    uint8 CHW -> resize the short side to `resize` (data.eval_resize; default image_size), center crop
    image_size, scale to [0, 1], normalise."""
    return v2.Compose([v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


def delivers_uint8(data: DataSpec) -> bool:
    """Whether training batches leave the loader as uint8 and are normalised by the training loop (on its
    device): 4x less to move from loader workers (+30-60% images/s here, `bench ingest`). Not when an
    augmentation works on floats (`FLOAT_ONLY_AUGMENTATIONS`) or MixUp/CutMix mix the batch in the loader."""
    names = [augmentation_entry(entry)[0] for entry in data.augment]
    return not any(name in FLOAT_ONLY_AUGMENTATIONS for name in names) and data.mixup_alpha == 0 and data.cutmix_alpha == 0


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> what build_transform's last two steps give each image (bitwise the same)."""
    return v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), list(mean), list(std))


def build_transform(data: DataSpec, train: bool, pre_sized: bool, uint8_out: bool = False) -> v2.Compose:
    """uint8 CHW tensor -> normalised float tensor of image_size x image_size (with `uint8_out`, a training
    transform that stops before the float conversion: see `delivers_uint8`).

    Training augmentations run in the order written; a resize to image_size comes first unless a
    random_resized_crop makes the size (or the images are already sized).
    """
    size = data.image_size
    if not train and (not pre_sized or data.eval_resize is not None):
        return eval_transform(size, data.mean, data.std, data.eval_resize)
    entries = [augmentation_entry(entry) for entry in data.augment] if train else []
    steps: list[torch.nn.Module] = []
    if "random_resized_crop" not in [name for name, _ in entries] and not pre_sized:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    is_float = False
    for name, arguments in entries:
        if name in FLOAT_ONLY_AUGMENTATIONS and not is_float:
            steps.append(v2.ToDtype(torch.float32, scale=True))
            is_float = True
        steps.append(AUGMENTATIONS[name](size, **arguments))
    if uint8_out and train and not is_float:
        return v2.Compose(steps or [v2.Identity()])
    if not is_float:
        steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(mean=list(data.mean), std=list(data.std)))
    return v2.Compose(steps)


def resize_array(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, S, S, 3) uint8, bilinear with antialias, done once."""
    if images.shape[1:3] == (image_size, image_size):
        return images
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    resized = torch.nn.functional.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
