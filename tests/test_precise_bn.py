""" timm_gpd.precise_bn: running statistics recomputed for the current weights. """
import pytest
import timm
import torch
import torch.nn as nn

import timm_gpd
from timm_gpd.precise_bn import recompute_bn_stats, running_stat_norms


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=g) * 2 + 1 for _ in range(n)]


def test_stats_are_the_average_of_batch_stats():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Dropout(0.5), bn)
    batches = _batches()
    used = recompute_bn_stats(model, batches, model)
    assert used == len(batches)
    means = torch.stack([b.mean((0, 2, 3)) for b in batches])
    vars_ = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, vars_.mean(0))


def test_modes_momentum_counter_and_rng_are_left_alone():
    model = timm.create_model('resnet10t', num_classes=4, drop_rate=0.5)
    model.train()
    model.fc.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    norms = running_stat_norms(model)
    counters = [m.num_batches_tracked.clone() for m in norms]
    torch.manual_seed(3)
    expected_draw = torch.rand(1)
    torch.manual_seed(3)
    recompute_bn_stats(model, _batches(2), model)
    assert torch.rand(1) == expected_draw, 'dropout / drop-path must not run: no random numbers drawn'
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(m.momentum == 0.1 for m in norms)
    assert all(torch.equal(m.num_batches_tracked, c) for m, c in zip(norms, counters))


def test_no_batch_or_a_failure_keeps_the_old_stats():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    recompute_bn_stats(model, _batches(2), model)
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    assert recompute_bn_stats(model, [], model) == 0

    def failing():
        yield _batches(1)[0]
        raise RuntimeError('loader died')

    with pytest.raises(RuntimeError, match='loader died'):
        recompute_bn_stats(model, failing(), model)
    torch.testing.assert_close(model[1].running_mean, before[0])
    torch.testing.assert_close(model[1].running_var, before[1])


def test_gpd_student_eval_matches_its_train_mode_after_recompute():
    """ The case it is for: the GPD student's running stats lag its weights; after recomputing on
    a batch, eval mode on that batch nearly equals train mode (batch statistics) on it. """
    torch.manual_seed(0)
    student = timm.create_model('resnet10t', num_classes=4)
    gpd = timm_gpd.GPDModel(student, ratio=2.0, check=False)
    x = torch.randn(32, 3, 32, 32) * 2 + 1

    def max_diff(a, b):
        return max((u - v).abs().max().item() for u, v in zip(a, b))

    with torch.no_grad():
        for p in gpd.parameters():  # weights far from what the (init) running stats describe
            p.add_(torch.randn_like(p) * 0.05)
        gpd.train()
        train_mode = gpd(x, mode='both')
        gpd.eval()
        stale = max_diff(gpd(x, mode='both'), train_mode)
        recompute_bn_stats(gpd, [x], lambda b: gpd(b, mode='both'))
        assert gpd.student.training is False and gpd.teacher.training is False
        recomputed = max_diff(gpd(x, mode='both'), train_mode)
    # not equal: eval normalizes with the unbiased batch variance, train mode with the biased one
    assert recomputed < 0.1 * stale, (recomputed, stale)
