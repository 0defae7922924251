"""One training epoch and one evaluation pass. Imports no Ray.

`train_one_epoch(trainee, loader, settings, epoch, first_step)` runs exactly
`settings.steps_per_epoch` optimizer steps, each over
`grad_accum_steps` micro-batches (DDP's `no_sync` on all but the last), sets the LR from the pure
schedule before every step, and supports AMP (bf16 on CPU and GPU, fp16 with a GradScaler on GPU),
channels_last and gradient clipping. The loss stays on the device: the host reads it only when
asked (the progress throttle, about 2/s, through `on_step`'s tensor), every DIVERGENCE_CHECK_STEPS
optimizer steps and at the epoch's end, when a NaN or infinite loss raises `DivergenceError` naming
the epoch and the first step it happened at (one collective then, none per step). `data_wait_s` is the
time the loop waited for the loader. `evaluate` sums loss and top-1/top-5 hits over the rank's shard
and all-reduces them when torch.distributed is up.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.train.models import model_output_logits
from orchestrator.train.optim import SwatsTracker, apply_lr

AUX_LOSS_WEIGHT = 0.4  # inception/googlenet auxiliary heads, as torchvision's reference recipe
DIVERGENCE_CHECK_STEPS = 32
"""optimizer steps between the host's checks that the loss is finite (one small all-reduce each); a
diverged run stops within this many steps, naming the step it diverged at"""


class DivergenceError(RuntimeError):
    """The training loss (`what` "loss") or the validation loss ("validation loss") became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float, what: str = "loss", noticed_at: int | None = None):
        self.epoch, self.step, self.loss = epoch, step, loss
        where = f"step {step} (optimizer step, 0-based)" if what == "loss" else f"after step {step} (optimizer steps done)"
        if noticed_at is not None and noticed_at != step:
            where += f", noticed at step {noticed_at}"
        super().__init__(f"{what} diverged ({loss}) at epoch {epoch}, {where}; "
                         "lower optim.base_lr, add warmup, or set optim.grad_clip_norm")


@dataclass
class EpochStats:
    train_loss: float
    """mean loss over this rank's micro-batches (all ranks averaged when distributed)"""
    images: int
    """images trained on, all ranks together"""
    seconds: float
    last_lrs: list[float]
    steps: int
    data_wait_s: float = 0.0
    """seconds of `seconds` this rank waited for the loader's next batch"""


@dataclass
class EvalStats:
    loss: float
    acc1: float
    acc5: float
    images: int
    seconds: float = 0.0
    balanced_acc: float = float("nan")
    """the mean over classes of each class's recall (classes with images in the split)"""
    macro_f1: float = float("nan")
    """the mean over classes of F1 (classes with images or predictions), as sklearn's f1_score(average='macro')"""


@dataclass(frozen=True)
class StepSettings:
    """How every optimizer step of a run is taken."""

    steps_per_epoch: int
    """optimizer steps per epoch (the plan's)"""
    grad_accum_steps: int
    """micro-batches per optimizer step"""
    lr_multiplier: Callable[[int], float | dict[str, float]]
    """the schedule: factor on every group's base_lr at an optimizer step, or {group name: factor}"""
    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    grad_clip_norm: float | None = None
    label_smoothing: float = 0.0
    """of the training cross-entropy (loss.label_smoothing)"""
    mean_std: tuple | None = None
    """(mean, std) to normalise uint8 training batches with on the device (data.datasets.delivers_uint8)"""
    checkpoint_every_steps: int | None = None
    """run.checkpoint_every_steps: the loss is checked before every mid-epoch checkpoint"""
    class_weights: tuple[float, ...] | None = None
    """the training loss's weight of each class (plan.class_weights); None: unweighted"""

    def must_check(self, step: int) -> bool:
        """Whether the loss is checked after optimizer step `step` (0-based, global): every
        DIVERGENCE_CHECK_STEPS steps and before a mid-epoch checkpoint; the same steps on every rank."""
        done = step + 1
        return done % DIVERGENCE_CHECK_STEPS == 0 or bool(self.checkpoint_every_steps and done % self.checkpoint_every_steps == 0)


@dataclass
class Trainee:
    """What trains: the model (unwrapped, and as the framework wraps it) and its optimizer with helpers."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    wrapped: nn.Module | None = None
    """the model as DDP wraps it; None: train the model itself"""
    optimizer_name: str = ""
    """the optimizer in use now (SWATS changes adam/adamw to sgd)"""
    swats: SwatsTracker | None = None
    scaler: torch.amp.GradScaler | None = None
    frozen: list[str] = field(default_factory=list)
    """parameter names still frozen"""
    eval_modules: list[nn.Module] = field(default_factory=list)
    """modules kept in eval mode while training (frozen BatchNorm when model.train_bn is false)"""
    ema: torch.optim.swa_utils.AveragedModel | None = None
    """exponential moving average of the weights and buffers, updated after every optimizer step"""

    @property
    def evaluated(self) -> nn.Module:
        """The model evaluated, checkpointed as best and exported: the EMA when kept, else the model."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def tracking_swats(self) -> bool:
        """SWATS watches Adam's steps until the switch to SGD."""
        return self.swats is not None and self.optimizer_name != "sgd"


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def classification_loss(output, labels: torch.Tensor, label_smoothing: float = 0.0,
                        weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss with aux heads weighted in, main logits). `labels`: class indices, or class probabilities
    (N, classes) as MixUp/CutMix make them; `weight`: per-class weights of the loss (None: unweighted)."""
    logits, aux = model_output_logits(output)
    loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=label_smoothing)
    for aux_logits in aux:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux_logits, labels, weight=weight, label_smoothing=label_smoothing)
    return loss, logits


def _micro_batches(loader, accum: int, steps: int, waited: list[float]) -> Iterator[list]:
    """Groups of `accum` micro-batches, `steps` groups at most (a trailing partial group is dropped);
    the seconds spent waiting for the loader are added to waited[0]."""
    group = []
    done = 0
    batches = iter(loader)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        waited[0] += time.perf_counter() - started
        if batch is None:
            return
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
            done += 1
            if done == steps:
                return


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool,
               mean_std: tuple | None = None):
    """Batch to the device; uint8 images (as the loader delivers them) are scaled and normalised there."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        from orchestrator.data.transforms import normalize_batch

        if mean_std is None:
            raise ValueError("uint8 images reached the loop without StepSettings.mean_std to normalise them")
        images = normalize_batch(images, *mean_std)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


NO_STEP = 2**62


class LossWatch:
    """An epoch's training loss on the device: its running sum and the first optimizer step whose loss was
    not finite. Adding to it never makes the host wait for the device; `check` and `total` do."""

    def __init__(self, device: torch.device, carried_sum: float = 0.0):
        self.sum = torch.tensor(carried_sum, dtype=torch.float64, device=device)
        self.first_bad = torch.tensor(NO_STEP, dtype=torch.int64, device=device)
        self.bad_value = torch.tensor(float("nan"), dtype=torch.float64, device=device)

    def add(self, step_loss: torch.Tensor, step: int) -> None:
        """`step_loss`: the summed loss of optimizer step `step`'s micro-batches (a device scalar)."""
        value = step_loss.detach().double()
        self.sum += value
        new = ~torch.isfinite(value) & (self.first_bad == NO_STEP)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_value = torch.where(new, value, self.bad_value)

    def check(self, epoch: int, now: int, device: torch.device) -> None:
        """DivergenceError on every rank when any rank's loss was not finite: one all-reduce (every rank calls
        this at the same steps), naming the first such step."""
        first = torch.stack([self.first_bad.double(), self.bad_value])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first[:1], op=dist.ReduceOp.MIN)
        step, value = first.tolist()
        if step < NO_STEP:
            raise DivergenceError(epoch, int(step), value, noticed_at=now)


@dataclass
class Tally:
    """An epoch's running sums on this rank (a mid-epoch checkpoint carries them, so a resumed epoch
    reports what an unbroken one would)."""

    loss_sum: float | torch.Tensor = 0.0
    """a float, or while the epoch runs a tensor on the device (read by the host only when needed)"""
    micro_batches: int = 0
    images: int = 0
    seconds: float = 0.0
    """training seconds of the epoch before this process took it over"""
    data_wait_s: float = 0.0
    """of those, seconds spent waiting for the loader"""

    def to_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "micro_batches": self.micro_batches, "images": self.images,
                "seconds": self.seconds, "data_wait_s": self.data_wait_s}


def train_one_epoch(trainee: Trainee, loader, settings: StepSettings, epoch: int, first_step: int,
                    on_step: Callable[[int, torch.Tensor, list[float]], None] | None = None, skip_steps: int = 0,
                    tally: Tally | None = None) -> EpochStats:
    """Train `settings.steps_per_epoch` optimizer steps numbered from `first_step` (global, 0-based).

    `skip_steps`: steps of this epoch done before (a mid-epoch resume): the loader already skips their
    batches, training starts at step first_step + skip_steps, and `tally` holds their running sums.
    `on_step(step, loss, lrs)` is called after each step, with `tally` up to date and `loss` the step's
    mean loss as a device scalar (reading it makes the host wait for the device: do it rarely). The loss
    is checked to be finite at the steps `settings.must_check` names and at the end (see LossWatch).
    """
    model, optimizer, accum = trainee.wrapped or trainee.model, trainee.optimizer, settings.grad_accum_steps
    model.train()
    for module in trainee.eval_modules:
        module.eval()
    start = time.perf_counter()
    tally = tally if tally is not None else Tally()
    watch = LossWatch(settings.device, float(tally.loss_sum))
    tally.loss_sum = watch.sum
    waited = [0.0]
    lrs = []
    step = first_step + skip_steps
    for group in _micro_batches(loader, accum, settings.steps_per_epoch - skip_steps, waited):
        lrs = apply_lr(optimizer, settings.lr_multiplier(step))
        step_loss = _forward_backward(trainee, model, group, settings)
        tally.images += sum(len(labels) for _, labels in group)
        watch.add(step_loss, step)
        _optimizer_step(trainee, settings.grad_clip_norm)
        optimizer.zero_grad(set_to_none=True)
        tally.loss_sum = watch.sum
        tally.micro_batches += len(group)
        if settings.must_check(step):
            watch.check(epoch, step, settings.device)
        if on_step:
            on_step(step, step_loss / len(group), lrs)
        step += 1
    if step - first_step != settings.steps_per_epoch:
        raise RuntimeError(f"epoch {epoch}: the loader gave {step - first_step} optimizer steps, "
                           f"the plan expects {settings.steps_per_epoch}")
    watch.check(epoch, step - 1, settings.device)
    tally.loss_sum = float(watch.sum)
    tally.data_wait_s += waited[0]
    total_loss, total_micro, total_images = _all_reduce([tally.loss_sum, tally.micro_batches, tally.images],
                                                        settings.device)
    return EpochStats(total_loss / max(total_micro, 1), int(total_images), tally.seconds + time.perf_counter() - start,
                      lrs, settings.steps_per_epoch, tally.data_wait_s)


def _forward_backward(trainee: Trainee, model: nn.Module, group: list, settings: StepSettings) -> torch.Tensor:
    """Forward and backward over one optimizer step's micro-batches (DDP syncs gradients on the last);
    returns the summed loss, on the device."""
    accum = len(group)
    step_loss = torch.zeros((), device=settings.device)
    weight = _class_weight_tensor(settings.class_weights, settings.device)
    for i, (batch_images, labels) in enumerate(group):
        batch_images, labels = _to_device(batch_images, labels, settings.device, settings.channels_last,
                                          settings.mean_std)
        last = i == accum - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(settings.device, settings.amp):
                loss, _ = classification_loss(model(batch_images), labels, settings.label_smoothing, weight)
            scaled = loss / accum
            (trainee.scaler.scale(scaled) if trainee.scaler else scaled).backward()
        step_loss = step_loss + loss.detach().float()
    return step_loss


@functools.lru_cache(maxsize=4)
def _class_weight_tensor(weights: tuple[float, ...] | None, device: torch.device) -> torch.Tensor | None:
    """The class weights on the device, made once (not a host-to-device copy every step)."""
    return None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)


def _optimizer_step(trainee: Trainee, grad_clip_norm: float | None) -> None:
    optimizer, scaler = trainee.optimizer, trainee.scaler
    swats = trainee.swats if trainee.tracking_swats else None
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip_norm)
    if swats:
        swats.before_step(optimizer)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if swats:
        swats.after_step(optimizer)
    if trainee.ema is not None:
        trainee.ema.update_parameters(trainee.model)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's AveragedModel as an EMA of parameters and buffers (BN statistics), as torchvision's recipe."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none", channels_last: bool = False) -> EvalStats:
    """Mean loss, top-1 and top-5 accuracy, balanced accuracy and macro F1 (fractions) over the whole
    split, all ranks together."""
    started = time.perf_counter()
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # loss, top-1 hits, top-5 hits: read once, at the end
    per_class = None   # (3, classes): images, correct top-1, top-1 predictions of each class
    count = 0
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with autocast(device, amp):
            logits, _ = model_output_logits(model(images))
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top.eq(labels[:, None])
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), correct[:, :1].sum(),
                             correct.any(dim=1).sum()]).double()
        per_class = _class_tally(per_class, labels, top[:, 0], logits.shape[1])
        count += len(labels)
    # a rank whose share of the split is empty has no tally: it sends zeros of the others' length
    classes = int(_all_reduce([per_class.shape[1] if per_class is not None else 0], device, dist.ReduceOp.MAX)[0])
    tally = per_class.flatten().tolist() if per_class is not None else [0.0] * (3 * classes)
    reduced = _all_reduce([*sums.tolist(), count, *tally], device)
    loss_sum, hits1, hits5, count = reduced[:4]
    seconds = time.perf_counter() - started
    if count == 0:
        return EvalStats(float("nan"), float("nan"), float("nan"), 0, seconds)
    balanced, f1 = class_balanced_scores(torch.tensor(reduced[4:], dtype=torch.float64).reshape(3, classes))
    return EvalStats(loss_sum / count, hits1 / count, hits5 / count, int(count), seconds, balanced, f1)


def _class_tally(tally: torch.Tensor | None, labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Adds a batch's per-class images, correct top-1 and top-1 predictions to `tally` (3, classes), on the device."""
    if tally is None:
        tally = torch.zeros(3, classes, dtype=torch.float64, device=labels.device)
    tally[0] += torch.bincount(labels, minlength=classes).double()
    tally[1] += torch.bincount(labels[predicted == labels], minlength=classes).double()
    tally[2] += torch.bincount(predicted, minlength=classes).double()
    return tally


def class_balanced_scores(tally: torch.Tensor) -> tuple[float, float]:
    """(balanced accuracy, macro F1) from per-class (images, correct, predicted) counts."""
    images, correct, predicted = tally
    present = images > 0
    balanced = float((correct[present] / images[present]).mean()) if present.any() else float("nan")
    seen = present | (predicted > 0)
    f1 = 2 * correct[seen] / (images[seen] + predicted[seen])
    return balanced, float(f1.mean()) if seen.any() else float("nan")
