"""The Ray-free loop: accumulation, AMP, clipping, divergence, evaluation."""


import pytest
import torch
from torch import nn

from orchestrator.config.plan import plan_groups
from orchestrator.config.spec import JobSpec
from orchestrator.train.loop import DivergenceError, StepSettings, Trainee, evaluate, train_one_epoch
from orchestrator.train.optim import build_optimizer

CPU = torch.device("cpu")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def batches(count: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)]


def sgd_for(model, lr=0.1):
    spec = JobSpec.model_validate({"optim": {"name": "sgd", "momentum": 0.9, "weight_decay": 0.0, "norm_bias_weight_decay": None}})
    return build_optimizer(model, plan_groups(spec, scaled_lr=lr), spec.optim)


def settings(steps, accum=1, lr_multiplier=lambda step: 1.0, **kwargs) -> StepSettings:
    return StepSettings(steps, accum, lr_multiplier, CPU, **kwargs)


def run(model, data, accum, steps, **kwargs):
    return train_one_epoch(Trainee(model, sgd_for(model)), data, settings(steps, accum, **kwargs), epoch=0, first_step=0)


def test_accumulation_equals_one_big_batch():
    big = batches(3, 16)
    small = [(x[i:i + 8], y[i:i + 8]) for x, y in big for i in (0, 8)]
    a, b = small_net(), small_net()
    run(a, big, accum=1, steps=3)
    run(b, small, accum=2, steps=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_runs_exactly_the_planned_steps_and_reports_lrs():
    model = small_net()
    optimizer = sgd_for(model)
    seen = []
    stats = train_one_epoch(Trainee(model, optimizer), batches(5, 4), settings(2, 2, lambda step: 1.0 / step),
                            epoch=2, first_step=10, on_step=lambda step, loss, lrs: seen.append((step, lrs[0])))
    assert [s for s, _ in seen] == [10, 11]
    assert seen[1][1] == pytest.approx(0.1 / 11)
    assert stats.images == 16 and stats.steps == 2
    with pytest.raises(RuntimeError, match="the loader gave 2 optimizer steps, the plan expects 3"):
        run(small_net(), batches(4, 4), accum=2, steps=3)


def test_nan_loss_names_epoch_and_step():
    model = small_net()
    data = batches(3, 4)
    data[2] = (torch.full((4, 3, 8, 8), float("nan")), data[2][1])
    optimizer = sgd_for(model)
    with pytest.raises(DivergenceError, match=r"at epoch 4, step 7 \(optimizer step, 0-based\);"):
        train_one_epoch(Trainee(model, optimizer), data, settings(3), epoch=4, first_step=5)


def test_a_nan_is_caught_at_the_next_check_naming_the_step_it_happened_at():
    model = small_net()
    data = batches(40, 2)
    data[2] = (torch.full((2, 3, 8, 8), float("nan")), data[2][1])
    seen = []
    with pytest.raises(DivergenceError, match=r"at epoch 0, step 2 \(optimizer step, 0-based\), noticed at step 31;"):
        train_one_epoch(Trainee(model, sgd_for(model)), data, settings(40), epoch=0, first_step=0,
                        on_step=lambda step, loss, lrs: seen.append(step))
    assert seen == list(range(31))         # stopped at the check after step 31, before step 31 was reported


def test_an_epoch_reads_the_loss_on_the_host_only_at_its_checks(monkeypatch):
    """No .item(), float(tensor), .tolist() or bool(tensor) per step: 64 steps read the device 3 times
    (the checks after steps 31 and 63, and the epoch's total)."""
    model = small_net()
    data = batches(64, 2)
    reads = []
    for name in ("item", "__float__", "tolist", "__bool__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name) or _real(self, *a))
    stats = train_one_epoch(Trainee(model, sgd_for(model)), data, settings(64), epoch=0, first_step=0)
    monkeypatch.undo()
    assert stats.steps == 64 and len(reads) <= 4, reads


def test_bf16_autocast_and_channels_last_on_cpu_train_like_fp32():
    data = batches(2, 4)
    reference = run(small_net(), data, accum=1, steps=2)
    model = small_net().to(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    stats = run(model, data, accum=1, steps=2, amp="bf16", channels_last=True)
    assert stats.train_loss == pytest.approx(reference.train_loss, rel=0.05)   # bf16 keeps ~3 significant digits
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_gradient_clipping_bounds_the_first_update():
    """SGD's first step (momentum buffer = gradient, no weight decay) moves the weights by lr x the clipped gradient."""
    clip, lr = 1e-3, 0.1
    for grad_clip_norm, bounded in ((clip, True), (None, False)):
        model = small_net()
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        run(model, batches(1, 8), accum=1, steps=1, grad_clip_norm=grad_clip_norm)
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm()
        assert (moved <= lr * clip * 1.001) == bounded


def test_training_lowers_the_loss_and_evaluate_counts_every_image():
    model = small_net()
    data = batches(4, 16, seed=1)
    first = evaluate(model, data, CPU)
    optimizer = sgd_for(model, lr=0.05)
    for epoch in range(15):
        train_one_epoch(Trainee(model, optimizer), data, settings(4), epoch=epoch, first_step=epoch * 4)
    after = evaluate(model, data, CPU)
    assert after.images == 64
    assert after.loss < first.loss and after.acc1 > first.acc1
    assert after.acc5 == 1.0   # 3 classes: the top-5 always holds the label


def _evaluate_on_rank(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loader = batches(2, 5) if rank == 0 else []     # rank 1's share of the split is empty
        results.put((rank, evaluate(small_net(), loader, CPU)))
    finally:
        dist.destroy_process_group()


def test_a_rank_with_no_validation_images_still_gets_every_ranks_scores(tmp_path):
    """Fewer validation images than ranks: the rank with none sends a tally of the others' length."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=_evaluate_on_rank, args=(rank, str(tmp_path / "init"), results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    got = dict(results.get(timeout=120) for _ in ranks)
    for process in ranks:
        process.join(timeout=60)
    alone = evaluate(small_net(), batches(2, 5), CPU)
    assert got[0].images == got[1].images == 10
    assert got[0].acc1 == got[1].acc1 == alone.acc1 and got[0].macro_f1 == got[1].macro_f1 == alone.macro_f1
