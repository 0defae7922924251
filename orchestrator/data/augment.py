"""`data.augment`'s registry: each name and the torchvision v2 transform it builds from its arguments.

The names and the arguments each takes are `catalog.AUGMENTATIONS` (the spec's torch-free
validation reads that; `same_names` holds the two equal at import). `check_transforms` builds each
entry of a job once at 32 px to catch values a transform refuses (`plan`, `train`, `sweep`,
`submit`, `validate` and `find-lr` run it before anything starts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from orchestrator.config import catalog
from orchestrator.config.catalog import augmentation_entry, same_names
from orchestrator.config.errors import SpecError
from orchestrator.config.spec import JobSpec


class RandomRotate90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, chosen uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(0, 4, ())), dims=(-2, -1))

    def __repr__(self) -> str:
        return "RandomRotate90()"


AUGMENTATIONS: dict[str, Callable] = {
    "hflip": lambda size, p=0.5: v2.RandomHorizontalFlip(p),
    "vflip": lambda size, p=0.5: v2.RandomVerticalFlip(p),
    "rotate90": lambda size: RandomRotate90(),
    "rotate": lambda size, degrees=15: v2.RandomRotation(degrees),
    "color_jitter": lambda size, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0: v2.ColorJitter(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue),
    "random_resized_crop": lambda size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3): v2.RandomResizedCrop(
        size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
    "random_crop": lambda size, padding=None: v2.RandomCrop(size, padding=max(1, size // 8) if padding is None else padding),
    "blur": lambda size, kernel_size=3, sigma=(0.1, 1.5), p=0.5: v2.RandomApply(
        [v2.GaussianBlur(kernel_size=kernel_size, sigma=tuple(sigma))], p=p),
    "gaussian_noise": lambda size, sigma=0.05: v2.GaussianNoise(mean=0.0, sigma=sigma),
    "random_erasing": lambda size, p=0.5, scale=(0.02, 0.33): v2.RandomErasing(p=p, scale=tuple(scale)),
    "randaugment": lambda size, num_ops=2, magnitude=9: v2.RandAugment(num_ops=num_ops, magnitude=magnitude),
    "trivialaugment": lambda size: v2.TrivialAugmentWide(),
    "autoaugment": lambda size, policy="imagenet": v2.AutoAugment(v2.AutoAugmentPolicy[policy.upper()]),
}
"""data.augment names -> builder(image_size, **the entry's arguments) of a torch module"""
same_names(AUGMENTATIONS, catalog.AUGMENTATIONS, "data.augment.AUGMENTATIONS")
for _name, _build in AUGMENTATIONS.items():
    same_names([p for p in inspect.signature(_build).parameters if p != "size"], catalog.AUGMENTATIONS[_name],
               f"the arguments of augmentation {_name}")


def check_augmentation_values(entries: list) -> list[str]:
    """One problem line per entry (its names already checked with the spec) whose transform refuses its
    values, found by building it once at 32 px (imports torchvision)."""
    problems = []
    for index, entry in enumerate(entries):
        name, arguments = augmentation_entry(entry)
        try:
            AUGMENTATIONS[name](32, **arguments)
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"data.augment: entry {index} ({name}): {exc}")
    return problems


def check_transforms(spec: JobSpec) -> JobSpec:
    """The spec, or SpecError naming each data.augment entry whose transform refuses its values.

    Builds each transform once (imports torchvision, ~3 s here): kept out of `validate_spec` so that
    checking a job file stays light; `resolve_plan`, `validate` and `submit` run it.
    """
    problems = check_augmentation_values(spec.data.augment)
    if problems:
        raise SpecError(problems)
    return spec
