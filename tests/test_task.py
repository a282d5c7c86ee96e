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
