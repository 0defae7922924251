"""`model.arch: timm/<name>`: any of timm's models, built without downloads, and their pretrained weights.

A timm model is built by `timm.create_model(name, pretrained=False, num_classes=N)` (timm's own
`reset_classifier` head for N classes); its head is what `get_classifier()` returns, so `freeze:
[backbone]` freezes all but that. `model.weights: DEFAULT` (timm's default tag) or a tag (`fb_in22k`)
reads the file timm's `pretrained=True` would read from the Hugging Face cache
(`HF_HOME`/hub/models--timm--<name>.<tag>/snapshots/...), or the torch hub cache for the few weights
published by URL only: nothing is downloaded at run time. Names are checked against
`config/timm_names.txt` (no torch import), then against the installed timm. Imports no Ray.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from orchestrator.config.catalog import TIMM_PREFIX, timm_arch_names
from orchestrator.config.errors import JobError, SpecError, did_you_mean
from orchestrator.train.weight_files import WeightsError


class TimmBuildError(JobError, ValueError):
    """timm cannot build the model as the spec asks (models.build_architecture says it as a ModelError)."""


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def check_timm_arch(arch: str) -> None:
    """SpecError naming model.arch when neither the stored list nor the installed timm has the model."""
    name = arch.removeprefix(TIMM_PREFIX)
    if name in timm_arch_names():
        return
    import timm

    names = timm.list_models()
    if name not in names:
        raise SpecError([f"model.arch: timm has no model {name!r}{did_you_mean(name, names)}; valid: timm/ and "
                         f"any of timm.list_models() ({len(names)} names: resnet50, convnext_tiny, vit_small_patch16_224, ...)"])


def build_timm(arch: str, num_classes: int, dropout: float | None, image_size: int,
               drop_path_rate: float | None = None) -> nn.Module:
    """timm's model for num_classes, its own init, nothing downloaded (pretrained=False). Models with a
    fixed input size (ViTs) are built for `image_size`; ModelError naming the key a model does not take."""
    import timm

    name = arch.removeprefix(TIMM_PREFIX)
    kwargs = {} if dropout is None else {"drop_rate": dropout}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if _takes_img_size(name):
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        key = next((k for k in ("drop_path_rate", "drop_rate") if k in str(exc)), None)
        if key is None:
            raise TimmBuildError(f"model.arch: {arch} cannot be built (TypeError: {str(exc).splitlines()[0][:200]})") from None
        spec_key = "model.drop_path_rate" if key == "drop_path_rate" else "model.dropout"
        raise TimmBuildError(f"{spec_key}: {arch} takes no {key}; leave {spec_key} null") from None
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise TimmBuildError(f"model.arch: {arch} cannot be built ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None


def _takes_img_size(name: str) -> bool:
    """Whether timm builds `name` for one input size (its pretrained config says fixed_input_size: ViTs,
    Swin, ...), so it must be told ours."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def timm_head(model: nn.Module) -> tuple[str, ...]:
    """The module names of timm's classifier (`get_classifier()`; two for distilled models)."""
    classifier = model.get_classifier()
    parts = classifier if isinstance(classifier, tuple) else (classifier,)
    return tuple(sorted(name for name, module in model.named_modules() if any(module is p for p in parts)))


def timm_weights_file(arch: str, tag: str) -> tuple[Path, str]:
    """(cached file, label) of timm's pretrained weights `tag` (DEFAULT: timm's default) of `arch`;
    WeightsError saying where it was looked for when it is not on this machine."""
    from timm.models import get_pretrained_cfg

    name = arch.removeprefix(TIMM_PREFIX)
    full = name if tag == "DEFAULT" else f"{name}.{tag}"
    try:
        cfg = get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:   # a tag the architecture does not have
        cfg = None
    if cfg is None:
        import timm

        tags = sorted({m.split(".", 1)[1] for m in timm.list_pretrained(f"{name}.*")})
        raise WeightsError(f"model.weights: timm has no pretrained {full!r}; "
                           + (f"{arch}'s tags: DEFAULT, {', '.join(tags)}" if tags else f"{arch} has no pretrained weights"))
    label = f"timm {name}.{cfg.tag}" if cfg.tag else f"timm {name}"
    if cfg.hf_hub_id:
        return _hf_cached(cfg.hf_hub_id, label), label
    if cfg.url:
        import torch

        cached = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if cached.is_file():
            return cached, label
        raise WeightsError(f"model.weights: {label} is not on this machine: looked for {cached} (from {cfg.url}); "
                           "nothing is downloaded at run time")
    raise WeightsError(f"model.weights: {label} names no file (no Hugging Face id, no URL)")


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""the files a timm repository on the Hugging Face hub holds its weights in, in timm's order of preference"""


def _hf_cached(repo_id: str, label: str) -> Path:
    from huggingface_hub import constants, try_to_load_from_cache

    for file_name in HF_WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, file_name)
        if isinstance(found, str):
            return Path(found)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    raise WeightsError(f"model.weights: {label} is not on this machine: looked for {' or '.join(HF_WEIGHT_FILES)} in "
                       f"{folder}/snapshots/ (HF_HOME moves it); nothing is downloaded at run time: fetch it where there "
                       f"is a network with `huggingface-cli download {repo_id}` and copy the cache folder here")


def resample_position_embedding(model: nn.Module, state_dict: dict) -> tuple[dict, str | None]:
    """A ViT's absolute position embedding from weights trained at another image size, resampled to this
    model's patch grid as timm's own loading does (`resample_abs_pos_embed`, bicubic); (state dict, note)."""
    import math

    posemb, grid = state_dict.get("pos_embed"), getattr(getattr(model, "patch_embed", None), "grid_size", None)
    target = getattr(model, "pos_embed", None)
    if posemb is None or grid is None or target is None or posemb.shape == target.shape:
        return state_dict, None
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old_side = int(math.isqrt(posemb.shape[1] - prefix))
    resampled = resample_abs_pos_embed(posemb.float(), list(grid), [old_side, old_side], num_prefix_tokens=prefix)
    note = f"pos_embed resampled from a {old_side}x{old_side} to a {grid[0]}x{grid[1]} patch grid (timm's resample_abs_pos_embed)"
    return {**state_dict, "pos_embed": resampled.to(posemb.dtype)}, note
