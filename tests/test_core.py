"""Exact inverse reparameterization, hard sharing, CBR and extraction of the gpd_* models."""
import io
import pickle

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_gpd
from timm_gpd.reparam.branches import CBRConv2d
from timm_gpd.reparam.widen import max_logit_error

# deeper variants keep their block types but fewer blocks, to fit CPU test time
ENTRYPOINTS = {
    'gpd_resnet18': {},
    'gpd_resnet34': {'layers': (1, 1, 1, 1)},
    'gpd_resnet50': {'layers': (1, 1, 1, 1)},
    'gpd_mobilenetv1_100': {},
    'gpd_mobilenetv2_100': {},
}


def assert_same_function(reference, other, rel=1e-4):
    err, tol = max_logit_error(reference, other)
    assert err <= tol * rel / 1e-4, f'max |diff| {err:.3g} > {tol * rel / 1e-4:.3g}'


def train_steps(model, in_chans=3, steps=2, lr=0.05, img=32, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, in_chans, img, img, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        student, teacher = model(x, mode='both')
        loss = F.cross_entropy(student, y) + F.cross_entropy(teacher, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize('in_chans', [1, 3])
@pytest.mark.parametrize('cbr', [True, False])
@pytest.mark.parametrize('ratio', [2, 3, 1.5])
@pytest.mark.parametrize('name', list(ENTRYPOINTS))
def test_teacher_equals_student_at_init(name, ratio, cbr, in_chans):
    from family_helpers import make_student
    from timm_gpd.models._builder import create_gpd_student, wrap_gpd_student
    # the entrypoint's student with random norms and stats: timm zero-inits the last BN gamma of each
    # residual block, which would hide every residual branch from the comparison
    student = make_student(
        lambda num_classes, **kw: create_gpd_student(name, num_classes=num_classes, in_chans=in_chans, **kw),
        ENTRYPOINTS[name])
    assert any(m.weight.abs().min() > 0 for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    # the construction check is what this test does itself, in both modes
    model = wrap_gpd_student(name, student, ratio=ratio, cbr=cbr, check=False)
    assert isinstance(model, timm_gpd.GPDModel)
    # batch x final spatial size must exceed 2 or train-mode BatchNorm of 2 values is +-1 by fp noise
    x = torch.randn(4, in_chans, 64, 64)
    model.eval()
    with torch.no_grad():
        student, teacher = model.forward_both(x)
    assert_same_function(student, teacher)
    model.train()
    with torch.no_grad():
        student, teacher = model.forward_both(x)
    assert_same_function(student, teacher)
    # the DT really is wider
    s_width = model.student.get_classifier().in_features
    assert model.teacher.get_classifier().in_features == int(s_width * ratio + 0.5)


@pytest.mark.parametrize('ratio', [2, 3, 1.5])
def test_gpd_model_wraps_any_timm_model_and_matches_the_original(ratio):
    # with symmetry noise on: the student's own block must stay noise-free for any ratio
    student = timm.create_model('mobilenetv2_100', num_classes=10).eval()
    model = timm_gpd.GPDModel(student, ratio=ratio, cbr=False, noise=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_function(student(x), model(x))
        assert_same_function(student(x), model.forward_teacher(x))


def test_inverse_reparameterize_returns_plain_wide_model():
    narrow = timm.create_model('resnet34', num_classes=10, layers=(1, 1, 1, 1)).eval()
    wide = timm_gpd.inverse_reparameterize(narrow, ratio=2).eval()
    assert type(wide) is type(narrow)
    assert wide.fc.in_features == 2 * narrow.fc.in_features and wide.num_features == wide.fc.in_features
    assert wide.layer1[0].conv1.weight.shape == (128, 128, 3, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_function(narrow(x), wide(x))


@pytest.mark.parametrize('ratio', [2, 3, 1.5])
def test_symmetry_noise_sums_to_zero_over_copies_and_spares_the_student_block(ratio):
    from timm_gpd.reparam.expansion import COPY, MIX, ChannelMap, TensorPlan, student_view, symmetry_noise, widen_tensor
    out_map, in_map = ChannelMap.single(6, ratio), ChannelMap.single(4, ratio)
    plan = TensorPlan(((0, out_map, COPY), (1, in_map, MIX)))
    w = torch.randn(6, 4, 3, 3)
    wide = widen_tensor(w, plan)
    noise = symmetry_noise(wide, plan, 1.0, torch.Generator().manual_seed(0))
    per_input_channel = torch.zeros(noise.shape[0], 4, 3, 3).index_add_(1, in_map.source_index(), noise)
    assert per_input_channel.abs().max() < 1e-5
    assert noise[:6, :4].abs().max() == 0
    assert noise.abs().sum() > 1.0
    torch.testing.assert_close(student_view(wide + noise, plan), w)


def test_symmetry_noise_is_exact_and_breaks_symmetry():
    narrow = timm.create_model('resnet18', num_classes=10).eval()
    plain = timm_gpd.inverse_reparameterize(narrow, ratio=2, noise=0.0)
    noisy = timm_gpd.inverse_reparameterize(narrow, ratio=2, noise=0.05, seed=3)
    w, w0 = noisy.layer1[0].conv1.weight, plain.layer1[0].conv1.weight
    c = w.shape[1] // 2
    # block (0, 0) untouched, other blocks moved, copies of an input channel still sum to the weight
    assert torch.equal(w[:c, :c], w0[:c, :c])
    assert not torch.allclose(w[c:], w0[c:])
    torch.testing.assert_close(w[:, :c] + w[:, c:], w0[:, :c] + w0[:, c:], atol=1e-6, rtol=0)
    again = timm_gpd.inverse_reparameterize(narrow, ratio=2, noise=0.05, seed=3)
    assert torch.equal(again.layer1[0].conv1.weight, w)


def test_extracted_student_equals_gpd_student_after_training():
    torch.manual_seed(0)
    model = train_steps(timm.create_model('gpd_resnet18', num_classes=10, in_chans=1), in_chans=1)
    model.eval()
    plain = model.extract_student()
    assert type(plain).__name__ == 'ResNet'
    assert not any(isinstance(m, CBRConv2d) for m in plain.modules())
    stock = timm.create_model('resnet18', num_classes=10, in_chans=1)
    stock.load_state_dict(plain.state_dict(), strict=True)
    stock.eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        student = model(x)
        assert_same_function(student, stock(x), rel=1e-5)
        # the student's own running statistics were updated by training and are what got exported
        assert not torch.equal(stock.bn1.running_mean, torch.zeros_like(stock.bn1.running_mean))
        assert torch.equal(stock.bn1.running_mean, model.student.bn1.running_mean)


@pytest.mark.parametrize('name', ['gpd_mobilenetv2_100', 'gpd_mobilenetv1_100'])
def test_extraction_mobilenets_and_fractional_ratio(name):
    torch.manual_seed(0)
    model = train_steps(timm.create_model(name, num_classes=10, gpd_ratio=1.5), steps=2, img=64)
    model.eval()
    stock = timm.create_model(name[len('gpd_'):], num_classes=10)
    stock.load_state_dict(model.extract_student().state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_function(model(x), stock.eval()(x), rel=1e-5)


def test_extraction_from_model_ema_copy():
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = timm.create_model('gpd_resnet18', num_classes=10, gpd_ratio=2)
    ema = ModelEmaV3(model, decay=0.5)
    train_steps(model, steps=1)
    ema.update(model)
    plain = ema.module.extract_student()
    x = torch.randn(2, 3, 32, 32)
    ema.module.eval()
    with torch.no_grad():
        assert_same_function(ema.module(x), plain(x), rel=1e-5)


def test_student_loss_gradient_reaches_only_block0_of_teacher():
    # timm zero-inits each block's last BN gamma, which would hide the residual branches' gradients
    model = timm.create_model('gpd_resnet18', num_classes=10, gpd_cbr=False, zero_init_last=False)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    w = model.teacher.layer1[0].conv1.weight
    c = w.shape[0] // 2
    assert w.grad[:c, :c].abs().sum() > 0
    assert w.grad[c:].abs().sum() == 0 and w.grad[:, c:].abs().sum() == 0
    fc = model.teacher.fc.weight
    assert fc.grad[:, :fc.shape[1] // 2].abs().sum() > 0


@pytest.fixture(scope='module')
def resnet18_gpd():
    """One untrained gpd_resnet18 for the read-only tests (building it is the slow part)."""
    return timm.create_model('gpd_resnet18', num_classes=10).eval()


def test_parameters_listed_once_and_student_has_none(resnet18_gpd):
    model = resnet18_gpd
    names = [n for n, _ in model.named_parameters()]
    assert names and all(n.startswith('teacher.') for n in names)
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert any(k.startswith('student.') and 'running_mean' in k for k in model.state_dict())


def test_teacher_blocks_diverge_with_training():
    torch.manual_seed(0)
    model = timm.create_model('gpd_resnet18', num_classes=10, gpd_cbr=False, gpd_noise=0.0)
    w = model.teacher.layer1[0].conv2.weight
    c = w.shape[0] // 2
    assert torch.equal(w[:c, :c], w[c:, c:])  # without noise, replica blocks start identical
    train_steps(model, steps=2)
    assert not torch.allclose(w[:c, :c], w[c:, c:])


def test_state_dict_and_pickle_round_trip():
    torch.manual_seed(0)
    model = train_steps(timm.create_model('gpd_resnet18', num_classes=10), steps=1).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = timm.create_model('gpd_resnet18', num_classes=10, gpd_seed=7, gpd_check=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    other.eval()
    clone = pickle.loads(pickle.dumps(model)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in (other, clone):
            assert torch.equal(m(x), model(x))
            assert torch.equal(m(x, mode='teacher'), model(x, mode='teacher'))


class _ConcatBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(2 * c)

    def forward(self, x):
        return self.bn(torch.cat([x, self.conv(x)], 1))


class _ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _ConcatBlock(4)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_channel_concat_widens_exactly():
    # the concatenation's parts are laid out one after the other, each copy-major (spaces.py)
    net = _ConcatNet()
    wide = timm_gpd.inverse_reparameterize(net, ratio=2)  # checked exact
    assert wide.block.bn.num_features == 16 and wide.head.in_features == 16


class _ShuffleBlock(nn.Module):
    """A channel shuffle by reshapes: channels move in a way no rule or tracing follows."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)
        self.proj = nn.Conv2d(2 * c, 2 * c, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return self.proj(y.view(b, c // 2, 2, h, w).transpose(1, 2).reshape(b, c, h, w))


def test_channel_shuffle_is_located_and_refused():
    net = _ConcatNet()
    net.block = _ShuffleBlock(4)
    with pytest.raises(NotImplementedError, match=r'^block \(_ShuffleBlock\) combines channels'):
        timm_gpd.inverse_reparameterize(net, ratio=2)


def test_block_refused_up_front_is_named_with_its_path():
    with pytest.raises(NotImplementedError, match=r'^crpe1 \(ConvRelPosEnc\) splits its channels'):
        timm_gpd.GPDModel(timm.create_model('coat_tiny', num_classes=10), cbr=False)


def test_module_without_rule_is_refused_with_path():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(NotImplementedError, match=r'^1 \(torch\.nn\.modules\.activation\.PReLU\)'):
        timm_gpd.inverse_reparameterize(net, ratio=2)


@pytest.mark.parametrize('ratio', [0.5, 1, float('nan'), float('inf'), 'two', 1.001])
def test_bad_ratio_is_a_value_error_naming_it(ratio):
    with pytest.raises(ValueError, match='gpd_ratio'):
        timm.create_model('gpd_resnet18', num_classes=10, gpd_ratio=ratio)


def test_layernorm_model_refuses_fractional_ratio():
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, depth=1)
    with pytest.raises(ValueError, match='integer gpd_ratio'):
        timm_gpd.GPDModel(vit, ratio=1.5)


def test_unknown_gpd_kwarg_is_refused():
    with pytest.raises(TypeError, match='gpd_ration'):
        timm.create_model('gpd_resnet18', num_classes=10, gpd_ration=2)


def test_vit_teacher_equals_student_and_extracts():
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, depth=2, img_size=32, patch_size=8)
    model = timm_gpd.GPDModel(vit, ratio=2).eval()
    assert model.teacher.blocks[0].attn.num_heads == 2 * vit.blocks[0].attn.num_heads
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        student, teacher = model.forward_both(x)
        assert_same_function(student, teacher)
        assert_same_function(vit.eval()(x), student)
    train_steps(model, steps=1)
    model.eval()
    stock = timm.create_model('vit_tiny_patch16_224', num_classes=10, depth=2, img_size=32, patch_size=8)
    stock.load_state_dict(model.extract_student().state_dict(), strict=True)
    with torch.no_grad():
        assert_same_function(model(x), stock.eval()(x), rel=1e-5)


def test_forward_modes(resnet18_gpd):
    model = resnet18_gpd
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x, mode='student'))
        assert torch.equal(model(x, mode='teacher'), model.forward_teacher(x))
    with pytest.raises(ValueError, match='mode'):
        model(x, mode='dt')
