"""`optim.layer_decay`: the depth of every parameter, from the stem (0) to the head (the deepest layer).

The LR of a parameter at depth d of L layers is its group's LR x layer_decay ** (L - 1 - d) (BEiT; timm
`--layer-decay`): the head trains at the full LR, each layer below it at layer_decay times the one above.
timm models say their own layers (`group_matcher(coarse=False)`, as timm's `param_groups_layer_decay`
reads them). torchvision models are cut into stem, stages and head by their module tree: the
parameters before the first stage (conv1 + bn1, a ViT's patch embedding and tokens) are the stem;
each child of `features` / `trunk_output` and each encoder block of a ViT is a stage, as is every
other top-level module; the last top-level module holding parameters (fc, classifier, heads) is the head.
Read from the model alone, so the plan (on the meta device) and the optimizer agree.
Imports no Ray.
"""

from __future__ import annotations

from torch import nn

EXPANDED = ("features", "trunk_output", "encoder")
"""torchvision containers whose children are the stages (a ViT's encoder.layers: its blocks)"""


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: depth}, number of layers)."""
    if hasattr(model, "group_matcher"):
        return _timm_layers(model)
    head = [name for name, child in model.named_children() if any(True for _ in child.parameters())][-1:]
    units: list[str] = []
    unit_of: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if any(name == h or name.startswith(h + ".") for h in head):
            continue
        unit_of[name] = _unit(name)
        if unit_of[name] not in units:
            units.append(unit_of[name])
    stem = 0
    while stem < len(units) and _is_leaf(model, units[stem]):
        stem += 1
    depth = {unit: max(0, index - stem + 1) if stem else index for index, unit in enumerate(units)}
    num_layers = (max(depth.values()) if depth else -1) + 2
    return {name: depth[unit_of[name]] if name in unit_of else num_layers - 1 for name, _ in model.named_parameters()}, num_layers


def _unit(name: str) -> str:
    parts = name.split(".")
    if parts[0] in EXPANDED and len(parts) > 1:
        return ".".join(parts[:3] if parts[:2] == ["encoder", "layers"] and len(parts) > 2 else parts[:2])
    return parts[0]


def _is_leaf(model: nn.Module, unit: str) -> bool:
    """A bare parameter or a module without submodules that hold parameters (a conv, a norm)."""
    try:
        module = model.get_submodule(unit)
    except AttributeError:
        return True
    return not any(any(True for _ in child.parameters()) for child in module.children())


def _timm_layers(model: nn.Module) -> tuple[dict[str, int], int]:
    from timm.models import group_parameters

    layer_map = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    num_layers = max(layer_map.values()) + 1
    return {name: layer_map.get(name, num_layers - 1) for name, _ in model.named_parameters()}, num_layers


def layer_scale(depth: int, num_layers: int, layer_decay: float) -> float:
    """The LR factor at `depth` of `num_layers`: 1 at the head, layer_decay ** layers below it."""
    return layer_decay ** (num_layers - 1 - depth)
