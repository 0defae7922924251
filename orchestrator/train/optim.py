"""Optimizers over the trainable parameters, grouped as the plan says, plus SWATS.

`OPTIMIZERS` is the registry of `optim.name` values; adding an optimizer is one entry here and one line
in `catalog.OPTIMIZERS` (what it takes: momentum, nesterov, betas, SWATS), which the spec's checks read;
`same_names` holds the two equal at import.
Every torch param group carries `name`, `lr_mult` and `base_lr` (its peak LR); `apply_lr` writes
`base_lr x multiplier` into each group before every step, so the LR lives in the schedule, not in
hidden optimizer state. Norm-layer weights and biases (1-D tensors) get `norm_bias_weight_decay`.
LARS and LAMB come from timm.
SWATS (Keskar & Socher 2017): while Adam runs, `SwatsTracker` estimates the SGD learning rate from
the projection of each Adam step on its gradient; `switch_to_sgd` swaps the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from orchestrator.config.catalog import OPTIMIZER_NAMES, same_names
from orchestrator.config.plan import GroupSize, PlanGroup, assign_group
from orchestrator.config.spec import OptimSpec
from orchestrator.train.layer_decay import layer_ids
from orchestrator.train.models import FreezeError

OPTIMIZERS: dict[str, Callable[[list[dict], OptimSpec], torch.optim.Optimizer]] = {
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=0.0, betas=o.betas, eps=o.eps),
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=0.0, betas=o.betas, eps=o.eps),
    "rmsprop": lambda groups, o: torch.optim.RMSprop(groups, lr=0.0, momentum=o.momentum, eps=o.eps),
    "adagrad": lambda groups, o: torch.optim.Adagrad(groups, lr=0.0, eps=o.eps),
    "adadelta": lambda groups, o: torch.optim.Adadelta(groups, lr=0.0, eps=o.eps),
    "lars": lambda groups, o: _timm_optimizer("Lars")(groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov,
                                                      trust_coeff=o.trust_coeff),
    "lamb": lambda groups, o: _timm_optimizer("Lamb")(groups, lr=0.0, betas=o.betas, eps=o.eps, max_grad_norm=None),
}
"""optim.name -> builder(torch param groups carrying lr and weight_decay, optim spec); their names and what
each takes: catalog.OPTIMIZERS"""
same_names(OPTIMIZERS, OPTIMIZER_NAMES, "train.optim.OPTIMIZERS")


def _timm_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """timm's LARS (You et al. 2017) or LAMB (You et al. 2019). A parameter group whose weight decay is 0
    (norm weights and biases, by norm_bias_weight_decay's default) gets neither weight decay nor the
    trust ratio (timm's always_adapt=False), as the papers do; LAMB's gradient clipping is left to
    optim.grad_clip_norm."""
    import timm.optim

    return getattr(timm.optim, name)


def grouped_parameters(model: nn.Module, groups: list[PlanGroup]) -> list[list[tuple[str, nn.Parameter]]]:
    """Every parameter (trainable or not) sorted into the plan's groups."""
    members: list[list[tuple[str, nn.Parameter]]] = [[] for _ in groups]
    depth = layer_ids(model)[0] if any(g.layer is not None for g in groups) else {}
    for name, param in model.named_parameters():
        members[assign_group(name, param.ndim <= 1, groups, depth.get(name))].append((name, param))
    return members


def param_group_sizes(model: nn.Module, groups: list[PlanGroup]) -> list[GroupSize]:
    """Parameter counts (total, trainable) of each plan group, for the plan table."""
    return [
        GroupSize(g.name, sum(p.numel() for _, p in members), sum(p.numel() for _, p in members if p.requires_grad))
        for g, members in zip(groups, grouped_parameters(model, groups))
    ]


def build_optimizer(model: nn.Module, groups: list[PlanGroup], optim: OptimSpec) -> torch.optim.Optimizer:
    """optim.name over the parameters that require grad now, grouped as the plan says; empty groups left out."""
    torch_groups = []
    for g, members in zip(groups, grouped_parameters(model, groups)):
        params = [p for _, p in members if p.requires_grad]
        if params:
            torch_groups.append({"params": params, "name": g.name, "lr_mult": g.lr_mult, "base_lr": g.lr,
                                 "lr": g.lr, "weight_decay": g.weight_decay})
    if not torch_groups:
        raise FreezeError("model.freeze: every parameter is frozen; nothing would train")
    return OPTIMIZERS[optim.name](torch_groups, optim)


def rebuild_keeping_state(old: torch.optim.Optimizer, model: nn.Module, groups: list[PlanGroup],
                          optim: OptimSpec) -> torch.optim.Optimizer:
    """A new optimizer over what trains now (e.g. after unfreezing), carrying the old per-parameter state."""
    new = build_optimizer(model, groups, optim)
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
    return new


def factor_of(multipliers: float | Mapping[str, float], group_name: str) -> float:
    """A group's LR factor: one for all groups, or each group's own (per-group schedules)."""
    return multipliers if isinstance(multipliers, (int, float)) else multipliers[group_name]


def apply_lr(optimizer: torch.optim.Optimizer, multipliers: float | Mapping[str, float]) -> list[float]:
    """Set each group's LR to base_lr x its multiplier; returns the LRs set, in group order."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor_of(multipliers, group.get("name"))
        lrs.append(group["lr"])
    return lrs


class SwatsTracker:
    """Per-group estimate of the SGD LR to switch to (SWATS, Algorithm 1).

    After each Adam step p = w_new - w_old and gradient g: gamma = (p.p) / (-p.g); the estimate is
    the bias-corrected EMA of gamma with Adam's beta2. Call `before_step` and `after_step` around
    `optimizer.step()`.
    """

    def __init__(self, beta2: float):
        self.beta2 = beta2
        self.ema: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._before: list[list[torch.Tensor]] = []

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        for group, before in zip(optimizer.param_groups, self._before):
            step_sq = step_dot_grad = 0.0
            for param, old in zip(group["params"], before):
                if param.grad is None:
                    continue
                step = (param.detach() - old).float()
                step_sq += float(step.pow(2).sum())
                step_dot_grad += float((step * param.grad.float()).sum())
            if step_dot_grad < 0:  # a descent step: the projection is defined and positive
                name = group["name"]
                gamma = step_sq / -step_dot_grad
                self.ema[name] = self.beta2 * self.ema.get(name, 0.0) + (1 - self.beta2) * gamma
                self.count[name] = self.count.get(name, 0) + 1
        self._before = []

    def sgd_lr(self, group_name: str) -> float | None:
        """The bias-corrected estimate for a group, or None before any step was seen."""
        count = self.count.get(group_name, 0)
        return self.ema[group_name] / (1 - self.beta2 ** count) if count else None

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "count": dict(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.count = dict(state["ema"]), dict(state["count"])


def switch_to_sgd(adam: torch.optim.Optimizer, tracker: SwatsTracker, optim: OptimSpec,
                  multiplier_now: float | Mapping[str, float]) -> torch.optim.Optimizer:
    """SGD (momentum beta1, lr (1 - beta1) x estimate) over Adam's groups; the schedule goes on from here.

    Each group's base_lr is set so that base_lr x its multiplier now equals the SWATS LR at the switch.
    """
    beta1 = optim.betas[0]
    groups = []
    for group in adam.param_groups:
        estimate = tracker.sgd_lr(group["name"])
        lr_now = (1 - beta1) * estimate if estimate else group["lr"]
        groups.append({"params": group["params"], "name": group["name"], "lr_mult": group["lr_mult"],
                       "base_lr": lr_now / max(factor_of(multiplier_now, group["name"]), 1e-12), "lr": lr_now, "weight_decay": group["weight_decay"]})
    return torch.optim.SGD(groups, lr=0.0, momentum=beta1)
