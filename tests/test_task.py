import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_gpd.losses import DynamicTeacherKD, kd_loss_from_name
from timm_gpd.task import TrainTask


class TinyGPD(nn.Module):
    """ Stand-in for a GPD model: an MLP whose student is a view of the DT's weights.

    The DT is twice as wide; the student's hidden layer is the first half of the
    DT's hidden rows, and its classifier is 2x the first half of the DT's classifier
    columns (the replica convention). Deliberately no forward_both: the task must
    go through __call__.
    """

    def __init__(self, in_features=6, hidden=4, num_classes=5):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(in_features, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, num_classes)

    def _student(self, x):
        h = F.relu(F.linear(x, self.fc1.weight[:self.hidden], self.fc1.bias[:self.hidden]))
        return F.linear(h, 2 * self.fc2.weight[:, :self.hidden], self.fc2.bias)

    def _teacher(self, x):
        return self.fc2(F.relu(self.fc1(x)))

    def forward(self, x, mode='student'):
        if mode == 'both':
            return self._student(x), self._teacher(x)
        return self._teacher(x) if mode == 'teacher' else self._student(x)


class StaticTeacher(nn.Module):
    def __init__(self, in_features=6, num_classes=5):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        return self.bn(self.fc(x))


def _batch(n=8, in_features=6, num_classes=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, in_features, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def _gpd_task(model, teacher=None, lr=0.1, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    task = TrainTask(
        model, optimizer, nn.CrossEntropyLoss(label_smoothing=0.1),
        dynamic_teacher=True,
        static_teacher=teacher,
        kd_loss=kd_loss_from_name('kd', temperature=2.0) if teacher is not None else None,
        dt_loss=DynamicTeacherKD(weight=3.0, temperature=2.0),
        **kwargs,
    )
    return task, optimizer


def _kl(logits, target_logits, t):
    # KL(softmax(target/T) || softmax(logits/T)) * T^2, written with torch's own kl_div
    return F.kl_div(F.log_softmax(logits / t, -1), F.softmax(target_logits / t, -1), reduction='batchmean') * t * t


def test_gpd_step_is_one_optimizer_step():
    torch.manual_seed(0)
    model = TinyGPD()
    task, optimizer = _gpd_task(model, lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task.step(*_batch())
    assert len(steps) == 1 and task.num_updates == 1
    for n, p in model.named_parameters():
        # plain SGD: exactly one update of lr * grad from the pre-step weights
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * p.grad)


@pytest.mark.parametrize('with_teacher', [False, True])
def test_shared_grads_are_sum_of_dt_and_student_grads(with_teacher):
    torch.manual_seed(0)
    model = TinyGPD()
    teacher = StaticTeacher() if with_teacher else None
    x, y = _batch()

    # reference: the two losses of the design doc, differentiated separately
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    zs, zd = ref(x, mode='both')
    loss_dt = F.cross_entropy(zd, y, label_smoothing=0.1)
    loss_s = F.cross_entropy(zs, y, label_smoothing=0.1) + 3.0 * _kl(zs, zd.detach(), 2.0)
    if teacher is not None:
        with torch.no_grad():
            t = copy.deepcopy(teacher).eval()(x)
        loss_dt = loss_dt + _kl(zd, t, 2.0)
        loss_s = loss_s + _kl(zs, t, 2.0)
    grads_dt = torch.autograd.grad(loss_dt, params)
    grads_s = torch.autograd.grad(loss_s, params)

    task, _ = _gpd_task(model, teacher=teacher)
    parts = task.step(x, y)
    torch.testing.assert_close(parts['loss'], (loss_dt + loss_s).detach())
    for p, g_dt, g_s in zip(model.parameters(), grads_dt, grads_s):
        torch.testing.assert_close(p.grad, g_dt + g_s)
    # the model really shares weights: both losses reach the student's slice of fc1
    assert grads_dt[0][:4].abs().sum() > 0 and grads_s[0][:4].abs().sum() > 0
    assert grads_s[0][4:].abs().sum() == 0


def test_gpd_loss_parts():
    torch.manual_seed(0)
    task, _ = _gpd_task(TinyGPD(), teacher=StaticTeacher())
    parts = task.step(*_batch())
    assert set(parts) == {'loss', 'student_ce', 'student_kd', 'student_dt', 'dt_ce', 'dt_kd'}
    total = sum(v for k, v in parts.items() if k != 'loss')
    torch.testing.assert_close(parts['loss'], total)
    assert all(not v.requires_grad for v in parts.values())


def test_static_teacher_frozen_in_eval_mode():
    torch.manual_seed(0)
    teacher = StaticTeacher().train()
    before = copy.deepcopy(teacher.state_dict())
    task, _ = _gpd_task(TinyGPD(), teacher=teacher)
    task.step(*_batch())
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        # BN running stats included: eval mode never updates them
        assert torch.equal(v, before[k]), k


def test_plain_and_kd_baselines():
    torch.manual_seed(0)
    student = nn.Linear(6, 5)
    x, y = _batch()
    plain = TrainTask(student, torch.optim.SGD(student.parameters(), lr=0.1), nn.CrossEntropyLoss())
    parts = plain.step(x, y)
    assert set(parts) == {'loss', 'student_ce'}
    assert parts['loss'] == parts['student_ce']

    teacher = StaticTeacher()
    kd = TrainTask(
        student, torch.optim.SGD(student.parameters(), lr=0.1), nn.CrossEntropyLoss(),
        static_teacher=teacher, kd_loss=kd_loss_from_name('dkd', alpha=1.0, beta=0.5))
    parts = kd.step(x, y)
    assert set(parts) == {'loss', 'student_ce', 'student_kd'}
    with pytest.raises(ValueError, match='kd_loss'):
        TrainTask(student, kd.optimizer, nn.CrossEntropyLoss(), static_teacher=teacher)
    with pytest.raises(ValueError, match='dt_loss'):
        TrainTask(student, kd.optimizer, nn.CrossEntropyLoss(), dynamic_teacher=True)


def test_clip_grad_norm():
    torch.manual_seed(0)
    model = TinyGPD()
    task, _ = _gpd_task(model, clip_grad=1e-3)
    parts = task.step(*_batch())
    assert parts['grad_norm'] > 1e-3  # the raw norm is reported, and it was clipped
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)


def test_ema_updated_once_per_step():
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = TinyGPD()
    ema = ModelEmaV3(model, decay=0.5)
    task, _ = _gpd_task(model, model_ema=ema)
    task.step(*_batch())
    # ModelEmaV3 copies the weights on update step 1, then averages with `decay`
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, before[n])
    task.step(*_batch())
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.module.get_parameter(n), 0.5 * before[n] + 0.5 * p.detach())


def test_accelerate_step_matches_plain_pytorch():
    from accelerate import Accelerator
    torch.manual_seed(0)
    model = TinyGPD()
    ref_model = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prepared, opt = accelerator.prepare(model, opt)
    task = TrainTask(
        prepared, opt, nn.CrossEntropyLoss(), accelerator=accelerator, dynamic_teacher=True,
        dt_loss=DynamicTeacherKD(), clip_grad=5.0)
    ref_task = TrainTask(
        ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
        dynamic_teacher=True, dt_loss=DynamicTeacherKD(), clip_grad=5.0)
    for _ in range(2):
        parts, ref_parts = task.step(*_batch()), ref_task.step(*_batch())
        torch.testing.assert_close(parts['loss'], ref_parts['loss'])
    for p, q in zip(accelerator.unwrap_model(prepared).parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q)


def test_shared_grads_real_gpd_model():
    # the same identity on the real core: a widened timm ResNet whose student is a view of the DT
    import timm
    import timm_gpd
    torch.manual_seed(0)
    model = timm_gpd.GPDModel(timm.create_model('test_resnet', num_classes=5, in_chans=1), ratio=2.0)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])

    ref = copy.deepcopy(model).train()
    params = list(ref.parameters())
    zs, zd = ref(x, mode='both')
    loss_dt = F.cross_entropy(zd, y, label_smoothing=0.1)
    loss_s = F.cross_entropy(zs, y, label_smoothing=0.1) + 3.0 * _kl(zs, zd.detach(), 2.0)
    grads_dt = torch.autograd.grad(loss_dt, params, allow_unused=True)
    grads_s = torch.autograd.grad(loss_s, params, allow_unused=True)

    task, _ = _gpd_task(model)
    task.step(x, y)
    shared = 0
    for p, g_dt, g_s in zip(model.parameters(), grads_dt, grads_s):
        expected = sum(g for g in (g_dt, g_s) if g is not None)
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)
        shared += g_dt is not None and g_s is not None and g_s.abs().sum() > 0
    assert shared > 0


# ---------------------------------------------------------------- recipe features: mixup, accumulation, teacher input

class _RecordingCE(nn.Module):
    def __init__(self):
        super().__init__()
        self.targets = []

    def forward(self, logits, target):
        self.targets.append(target)
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def test_mixup_gives_soft_targets_to_student_and_dt_and_turns_off():
    from timm.data import Mixup
    torch.manual_seed(0)
    model, criterion = TinyGPD(), _RecordingCE()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0., label_smoothing=0.1, num_classes=5)
    task = TrainTask(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, dynamic_teacher=True,
                     dt_loss=DynamicTeacherKD(), mixup_fn=mixup, mixup_off_epoch=2)
    x, y = _batch()
    task.set_epoch(1)
    task.step(x, y)
    assert len(criterion.targets) == 2  # student CE and DT CE
    mixed = criterion.targets[0]
    assert mixed.shape == (8, 5) and torch.allclose(mixed.sum(-1), torch.ones(8))
    assert not torch.allclose(mixed, F.one_hot(y, 5) * 0.9 + 0.1 / 5)  # mixed, not the labels alone
    task.set_epoch(2)  # timm's --mixup-off-epoch: smoothed one-hot targets from then on
    task.step(x, y)
    off = criterion.targets[-1]
    torch.testing.assert_close(off, F.one_hot(y, 5) * 0.9 + 0.1 / 5)


def test_dkd_in_the_task_takes_mixed_targets():
    from timm.data import Mixup
    torch.manual_seed(0)
    model, teacher = TinyGPD(), StaticTeacher()
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0., label_smoothing=0.1, num_classes=5)
    task = TrainTask(model, torch.optim.SGD(model.parameters(), lr=0.1), _RecordingCE(), dynamic_teacher=True,
                     static_teacher=teacher, kd_loss=kd_loss_from_name('dkd'), dt_loss=DynamicTeacherKD(),
                     mixup_fn=mixup)
    parts = task.step(*_batch())
    assert torch.isfinite(parts['student_kd']) and torch.isfinite(parts['dt_kd'])


def _accum_run(num_batches, accum):
    """ TrainTask under Accelerate's gradient accumulation, over a prepared loader of num_batches. """
    from accelerate import Accelerator
    torch.manual_seed(0)
    model = TinyGPD()
    start = copy.deepcopy(model)
    xs, ys = _batch(n=4 * num_batches)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=4)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    prepared, opt, loader = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    task = TrainTask(prepared, opt, nn.CrossEntropyLoss(), accelerator=accelerator, dynamic_teacher=True,
                     dt_loss=DynamicTeacherKD(), grad_accum_steps=accum)
    steps = []
    opt.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    for i, (x, y) in enumerate(loader):
        task.step(x, y, i, len(loader))
    return start, accelerator.unwrap_model(prepared), len(steps), task.num_updates, (xs, ys)


@pytest.mark.parametrize('num_batches, accum', [(5, 2), (6, 3)])
def test_grad_accumulation_has_timm_semantics(num_batches, accum):
    start, trained, steps, updates, (xs, ys) = _accum_run(num_batches, accum)
    expected_updates = -(-num_batches // accum)
    assert steps == updates == expected_updates
    # by hand, as timm's train.py: each loss divided by its group's size (a last short group: its own)
    ref = copy.deepcopy(start)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    dt_loss = DynamicTeacherKD()
    for first in range(0, num_batches, accum):
        group = list(range(first, min(first + accum, num_batches)))
        opt.zero_grad()
        for b in group:
            x, y = xs[4 * b:4 * b + 4], ys[4 * b:4 * b + 4]
            zs, zd = ref(x, mode='both')
            loss = F.cross_entropy(zs, y) + dt_loss(zs, zd) + F.cross_entropy(zd, y)
            (loss / len(group)).backward()
        opt.step()
    for p, q in zip(trained.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_needs_matching_accelerator():
    model = TinyGPD()
    with pytest.raises(ValueError, match='gradient_accumulation_steps=2'):
        TrainTask(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), grad_accum_steps=2)


def test_renormalized_teacher_input():
    from timm_gpd.task import RenormalizedTeacher

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.pretrained_cfg = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
            self.seen = None

        def forward(self, x):
            self.seen = x
            return x.mean(dim=(2, 3))

    x = torch.randn(2, 3, 4, 4)
    probe = Probe()
    teacher = RenormalizedTeacher(probe, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert teacher.renormalizes
    teacher(x)
    pixels = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(probe.seen, expected)
    # the teacher's own statistics: its input is the student's, untouched
    same = RenormalizedTeacher(probe, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert not same.renormalizes
    same(x)
    assert probe.seen is x
    # grayscale batches with RGB teacher statistics: averaged over channels
    gray = RenormalizedTeacher(probe, (0.2860,), (0.3530,))
    gray(torch.randn(2, 1, 4, 4))
    assert probe.seen.shape == (2, 1, 4, 4)
    assert gray.teacher.mean_kd.flatten().tolist() == pytest.approx([0.4])
    assert not gray.train().training  # stays in eval mode
