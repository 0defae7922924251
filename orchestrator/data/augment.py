"""`data.augment`'s registry: each name, the arguments it takes, and the torchvision v2 transform it builds.

Torch-free to import, so that checking a job file does not import torch and torchvision (~3 s):
`check_augmentation` checks an entry's name and argument names; torchvision is imported only to
build a transform, which `check_augmentation_values` does once per entry at 32 px to catch values the
transform refuses (`plan`, `train`, `sweep`, `submit`, `validate` and `find-lr` run it before anything
starts).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable


def _v2():
    from torchvision.transforms import v2

    return v2


def _rotate90():
    from orchestrator.data.datasets import RandomRotate90

    return RandomRotate90()


AUGMENTATIONS: dict[str, Callable] = {
    "hflip": lambda size, p=0.5: _v2().RandomHorizontalFlip(p),
    "vflip": lambda size, p=0.5: _v2().RandomVerticalFlip(p),
    "rotate90": lambda size: _rotate90(),
    "rotate": lambda size, degrees=15: _v2().RandomRotation(degrees),
    "color_jitter": lambda size, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0: _v2().ColorJitter(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue),
    "random_resized_crop": lambda size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3): _v2().RandomResizedCrop(
        size, scale=tuple(scale), ratio=tuple(ratio), antialias=True),
    "random_crop": lambda size, padding=None: _v2().RandomCrop(size, padding=max(1, size // 8) if padding is None else padding),
    "blur": lambda size, kernel_size=3, sigma=(0.1, 1.5), p=0.5: _v2().RandomApply(
        [_v2().GaussianBlur(kernel_size=kernel_size, sigma=tuple(sigma))], p=p),
    "gaussian_noise": lambda size, sigma=0.05: _v2().GaussianNoise(mean=0.0, sigma=sigma),
    "random_erasing": lambda size, p=0.5, scale=(0.02, 0.33): _v2().RandomErasing(p=p, scale=tuple(scale)),
    "randaugment": lambda size, num_ops=2, magnitude=9: _v2().RandAugment(num_ops=num_ops, magnitude=magnitude),
    "trivialaugment": lambda size: _v2().TrivialAugmentWide(),
    "autoaugment": lambda size, policy="imagenet": _v2().AutoAugment(_v2().AutoAugmentPolicy[policy.upper()]),
}
"""data.augment names -> builder(image_size, **the entry's arguments) of a torch module"""
FLOAT_ONLY = ("gaussian_noise",)
"""augmentations of float images: the conversion to float moves before the first of them"""


def augmentation_entry(entry: str | dict) -> tuple[str, dict]:
    """(name, arguments) of a data.augment entry: a name, or a mapping with `name` and the arguments."""
    if isinstance(entry, str):
        return entry, {}
    arguments = dict(entry)
    return arguments.pop("name", None), arguments


def check_augmentation(entry, index: int) -> None:
    """ValueError saying what is wrong with data.augment entry `index`: not a name or mapping, an unknown
    name, or arguments its builder does not take. Imports no torch."""
    from orchestrator.spec import did_you_mean, one_of

    if not isinstance(entry, (str, dict)):
        raise ValueError(f"entry {index} must be a name or a mapping with a name (got {entry!r})")
    name, arguments = augmentation_entry(entry)
    if not isinstance(name, str):
        raise ValueError(f"entry {index} has no name (e.g. {{name: color_jitter, brightness: 0.2}})")
    one_of(name, list(AUGMENTATIONS), "augmentation")
    takes = [p for p in inspect.signature(AUGMENTATIONS[name]).parameters if p != "size"]
    unknown = [key for key in arguments if key not in takes]
    if unknown:
        raise ValueError(f"entry {index} ({name}): takes no {', '.join(map(repr, unknown))}"
                         f"{did_you_mean(unknown[0], takes)}; its arguments: {', '.join(takes) or 'none'}")


def check_augmentation_values(entries: list) -> list[str]:
    """One problem line per entry (already checked by `check_augmentation`) whose transform refuses its
    values, found by building it once at 32 px (imports torchvision)."""
    problems = []
    for index, entry in enumerate(entries):
        name, arguments = augmentation_entry(entry)
        try:
            AUGMENTATIONS[name](32, **arguments)
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"data.augment: entry {index} ({name}): {exc}")
    return problems
