import math

import pytest
import torch
import torch.nn as nn

from timm_gpd.losses import DecoupledKD, DynamicTeacherKD, SoftTargetKD, kd_loss_from_name


# direct formulas in plain Python, independent of the torch implementation
def softmax(v, t=1.0):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def tckd_direct(s, z, y, t):
    ps, pz = softmax(s, t), softmax(z, t)
    return kl([pz[y], 1 - pz[y]], [ps[y], 1 - ps[y]]) * t * t


def nckd_direct(s, z, y, t):
    rest = lambda v: [x for i, x in enumerate(v) if i != y]
    return kl(softmax(rest(z), t), softmax(rest(s), t)) * t * t


S = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 1.7, 0.0]]
Z = [[2.0, 0.5, 1.0, 0.0], [-1.0, 0.4, 2.5, 1.2]]
Y = [0, 2]


def test_kd_hand_value():
    # p_teacher = [3/4, 1/4], p_student = [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    loss = SoftTargetKD(1.0)(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]))
    assert loss.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


@pytest.mark.parametrize('t', [1.0, 4.0])
def test_kd_matches_direct_formula(t):
    loss = SoftTargetKD(t)(torch.tensor(S), torch.tensor(Z))
    expected = sum(kl(softmax(z, t), softmax(s, t)) for s, z in zip(S, Z)) / len(S) * t * t
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('t', [1.0, 2.0])
def test_dkd_target_part_only(t):
    # alpha=1, beta=0 leaves TCKD alone
    loss = DecoupledKD(alpha=1.0, beta=0.0, temperature=t)(torch.tensor(S), torch.tensor(Z), torch.tensor(Y))
    expected = sum(tckd_direct(s, z, y, t) for s, z, y in zip(S, Z, Y)) / len(S)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('t', [1.0, 2.0])
def test_dkd_weighted_sum(t):
    alpha, beta = 0.7, 2.0
    loss = DecoupledKD(alpha, beta, t)(torch.tensor(S), torch.tensor(Z), torch.tensor(Y))
    expected = sum(
        alpha * tckd_direct(s, z, y, t) + beta * nckd_direct(s, z, y, t) for s, z, y in zip(S, Z, Y)) / len(S)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_decomposes_kd():
    # the identity behind DKD: KD = TCKD + (1 - p_teacher[target]) * NCKD, per sample
    dkd = DecoupledKD()
    for s, z, y in zip(S, Z, Y):
        tckd, nckd = dkd.parts(torch.tensor([s]), torch.tensor([z]), torch.tensor([y]))
        kd = SoftTargetKD(1.0)(torch.tensor([s]), torch.tensor([z]))
        assert kd.item() == pytest.approx((tckd + (1 - softmax(z)[y]) * nckd).item(), rel=1e-5)


def test_dkd_stable_for_confident_logits():
    s = torch.tensor([[60.0, -60.0, 0.0]], requires_grad=True)
    loss = DecoupledKD(1.0, 1.0)(s, torch.tensor([[-50.0, 50.0, 0.0]]), torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_soft_targets_use_the_dominant_class():
    # a mixup target (lam 0.7 on class 2, 0.3 on class 0, smoothed) splits DKD at class 2
    from timm.data.mixup import mixup_target
    hard = torch.tensor([2, 1])
    soft = mixup_target(hard, 4, lam=1.0, smoothing=0.1)
    soft = 0.7 * soft + 0.3 * mixup_target(torch.tensor([0, 3]), 4, lam=1.0, smoothing=0.1)
    dkd = DecoupledKD(alpha=1.0, beta=0.5, temperature=2.0)
    s, z = torch.tensor(S), torch.tensor(Z)
    assert dkd(s, z, soft).item() == pytest.approx(dkd(s, z, hard).item(), rel=1e-6)
    assert dkd(s, z, soft).item() != pytest.approx(dkd(s, z, torch.tensor([0, 3])).item(), rel=1e-3)
    with pytest.raises(ValueError, match='class indices'):
        dkd(s, z, torch.rand(2, 4, 1))


def test_kd_equals_timm_logit_distillation_task():
    """ Our KD term is timm's LogitDistillationTask KD on the same logits (its forward, run with a
    student and a teacher that output these logits). """
    from timm.task import LogitDistillationTask

    class Fixed(nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits
            self.pretrained_cfg = dict(mean=(0.5,), std=(0.5,))
            self.num_classes, self.in_chans = logits.shape[1], 1

        def forward(self, x):
            return self.logits

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 10, (6,), generator=g)
    for t in (1.0, 4.0):
        task = LogitDistillationTask(Fixed(student), Fixed(teacher), criterion=nn.CrossEntropyLoss(),
                                     temperature=t, verbose=False)
        timm_kd = task(x, y)['kd_loss']
        ours = kd_loss_from_name('kd', alpha=1.0, temperature=t)(student, teacher, y)
        torch.testing.assert_close(ours, timm_kd, rtol=1e-6, atol=1e-7)


def test_dt_term_weight_and_detach():
    zs = torch.tensor(S, requires_grad=True)
    zd = torch.tensor(Z, requires_grad=True)
    loss = DynamicTeacherKD(weight=3.0, temperature=2.0)(zs, zd)
    expected = 3.0 * sum(kl(softmax(z, 2.0), softmax(s, 2.0)) for s, z in zip(S, Z)) / len(S) * 4.0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # the DT is taught by its own loss, never pulled towards the student by this term
    assert zd.grad is None
    assert zs.grad.abs().sum() > 0


def test_label_smoothing_ce_hand_value():
    # the CE used for student and DT: torch's label smoothing spreads eps uniformly over all classes
    eps, logits, y = 0.1, S[0], 1
    log_p = [math.log(p) for p in softmax(logits)]
    expected = -(1 - eps) * log_p[y] - eps / len(logits) * sum(log_p)
    loss = nn.CrossEntropyLoss(label_smoothing=eps)(torch.tensor([logits]), torch.tensor([y]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_from_name():
    s, z, y = torch.tensor(S), torch.tensor(Z), torch.tensor(Y)
    assert kd_loss_from_name('kd', alpha=2.0, temperature=3.0)(s, z, y).item() == pytest.approx(
        2.0 * SoftTargetKD(3.0)(s, z).item(), rel=1e-6)
    assert kd_loss_from_name('dkd', alpha=1.0, beta=0.5)(s, z, y).item() == pytest.approx(
        DecoupledKD(1.0, 0.5)(s, z, y).item(), rel=1e-6)
    with pytest.raises(ValueError, match='unknown KD loss'):
        kd_loss_from_name('mse')
    with pytest.raises(ValueError, match='temperature'):
        SoftTargetKD(0.0)
