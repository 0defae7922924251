"""Optimizers over the trainable parameters, grouped as the plan says, plus SWATS.

Every torch param group carries `name`, `lr_mult` and `base_lr` (its peak LR); `apply_lr` writes
`base_lr x multiplier` into each group before every step, so the LR lives in the schedule, not in
hidden optimizer state. Norm-layer weights and biases (1-D tensors) get `norm_bias_weight_decay`.
SWATS (Keskar & Socher 2017): while Adam runs, `SwatsTracker` estimates the SGD learning rate from
the projection of each Adam step on its gradient; `switch_to_sgd` swaps the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.models import FreezeError
from orchestrator.plan import GroupDef, GroupSize, assign_group, group_defs
from orchestrator.spec import JobSpec, OptimSpec


def grouped_parameters(model: nn.Module, defs: list[GroupDef]) -> list[list[tuple[str, nn.Parameter]]]:
    """Every parameter (trainable or not) sorted into the groups of `defs`."""
    groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in defs]
    for name, param in model.named_parameters():
        groups[assign_group(name, param.ndim <= 1, defs)].append((name, param))
    return groups


def param_group_sizes(model: nn.Module, spec: JobSpec) -> list[GroupSize]:
    """Parameter counts (total, trainable) of each plan group, for the plan table."""
    defs = group_defs(spec)
    return [
        GroupSize(d.name, sum(p.numel() for _, p in members), sum(p.numel() for _, p in members if p.requires_grad))
        for d, members in zip(defs, grouped_parameters(model, defs))
    ]


def make_torch_optimizer(name: str, param_groups: list[dict], optim: OptimSpec) -> torch.optim.Optimizer:
    """Factory by name; `param_groups` already carry lr and weight_decay."""
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=optim.momentum, nesterov=optim.nesterov)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=0.0, betas=optim.betas, eps=optim.eps)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=0.0, betas=optim.betas, eps=optim.eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=0.0, momentum=optim.momentum, eps=optim.eps)
    if name == "adagrad":
        return torch.optim.Adagrad(param_groups, lr=0.0, eps=optim.eps)
    if name == "adadelta":
        return torch.optim.Adadelta(param_groups, lr=0.0, eps=optim.eps)
    raise ValueError(f"optim.name: unknown optimizer {name!r}; valid: sgd, adam, adamw, rmsprop, adagrad, adadelta")


def build_optimizer(model: nn.Module, spec: JobSpec, scaled_lr: float) -> torch.optim.Optimizer:
    """The spec's optimizer over the parameters that require grad now; empty groups are left out."""
    defs = group_defs(spec)
    torch_groups = []
    for d, members in zip(defs, grouped_parameters(model, defs)):
        params = [p for _, p in members if p.requires_grad]
        if params:
            peak = scaled_lr * d.lr_mult
            torch_groups.append({"params": params, "name": d.name, "lr_mult": d.lr_mult, "base_lr": peak,
                                 "lr": peak, "weight_decay": d.weight_decay})
    if not torch_groups:
        raise FreezeError("model.freeze: every parameter is frozen; nothing would train")
    return make_torch_optimizer(spec.optim.name, torch_groups, spec.optim)


def rebuild_keeping_state(old: torch.optim.Optimizer, model: nn.Module, spec: JobSpec, scaled_lr: float) -> torch.optim.Optimizer:
    """A new optimizer over what trains now (e.g. after unfreezing), carrying the old per-parameter state."""
    new = build_optimizer(model, spec, scaled_lr)
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
    return new


def apply_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> list[float]:
    """Set each group's LR to base_lr x multiplier; returns the LRs set, in group order."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
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


def switch_to_sgd(adam: torch.optim.Optimizer, tracker: SwatsTracker, spec: JobSpec, multiplier_now: float) -> torch.optim.Optimizer:
    """SGD (momentum beta1, lr (1 - beta1) x estimate) over Adam's groups; the schedule goes on from here.

    Each group's base_lr is set so that base_lr x multiplier_now equals the SWATS LR at the switch.
    """
    beta1 = spec.optim.betas[0]
    groups = []
    for group in adam.param_groups:
        estimate = tracker.sgd_lr(group["name"])
        lr_now = (1 - beta1) * estimate if estimate else group["lr"]
        groups.append({"params": group["params"], "name": group["name"], "lr_mult": group["lr_mult"],
                       "base_lr": lr_now / max(multiplier_now, 1e-12), "lr": lr_now, "weight_decay": group["weight_decay"]})
    return torch.optim.SGD(groups, lr=0.0, momentum=beta1)
