"""timm families through the generic rules: family x ratio x CBR.

Each case checks that the dynamic teacher (DT) equals the GPD student at init in eval and
train mode, and that after a few SGD steps the extracted student equals the GPD student and
loads strict into the stock timm model. Families that cannot be widened exactly are refused
with a clear error.
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers.grn import GlobalResponseNorm

import timm_gpd
from family_helpers import (
    FAMILIES, FAMILY_RATIOS, INTEGER_RATIO_ONLY, NO_CBR_CONV, assert_same_function, create, make_student, sgd_steps)
from timm_gpd.reparam.branches import CBRConv2d
from timm_gpd.reparam.expansion import widened_size
from timm_gpd.reparam.widen import plan_expansion


CASES = [(f, arch, kw, r) for f, arch, kw in FAMILIES for r in FAMILY_RATIOS[f]]


@pytest.mark.parametrize('cbr', [True, False], ids=['cbr', 'plain'])
@pytest.mark.parametrize('family,arch,kwargs,ratio', CASES, ids=[f'{c[0]}-{c[3]}' for c in CASES])
def test_family(family, arch, kwargs, ratio, cbr):
    student = make_student(arch, kwargs)
    if family in INTEGER_RATIO_ONLY and ratio != int(ratio):
        with pytest.raises(ValueError, match='integer gpd_ratio'):
            timm_gpd.GPDModel(student, ratio=ratio, cbr=cbr)
        return
    model = timm_gpd.GPDModel(student, ratio=ratio, cbr=cbr)
    assert model.teacher.num_features == widened_size(student.num_features, ratio)
    assert 'student=' in repr(model)  # layers' extra_repr read the student's parameters
    assert any(isinstance(m, CBRConv2d) for m in model.teacher.modules()) == (cbr and family not in NO_CBR_CONV)
    # train-mode BatchNorm normalizes over batch x final spatial size (1x1 at 32 px): with a
    # batch of 2 that is +-1 up to fp noise, and 4 values still amplify the DT's rounding
    # differences to ~1e-4 relative (EfficientNet): 8 keep a 5x margin
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        model.eval()
        before, teacher = model(x, mode='both')
        assert_same_function(before, teacher)
        if not cbr or family in NO_CBR_CONV:  # else CBR from scratch changed the function
            assert_same_function(student.eval()(x), before)
        model.train()  # last: updates the running statistics
        assert_same_function(*model(x, mode='both'))

    sgd_steps(model, x)
    model.eval()
    plain = model.extract_student()
    assert type(plain) is type(student)
    assert not any(isinstance(m, CBRConv2d) for m in plain.modules())
    stock = create(arch, kwargs)
    stock.load_state_dict(plain.state_dict(), strict=True)
    stock.eval()
    with torch.no_grad():
        after = model(x)
        assert (after - before).abs().max() > 1e-3  # the steps did train the shared weights
        assert_same_function(after, stock(x), rel=1e-5)


@pytest.mark.parametrize('arch', ['regnetx_002', 'regnety_002'])
def test_fractional_ratio_rounds_grouped_spaces_up_to_whole_groups(arch):
    # 3 groups of 8 channels x1.5 would be 36: rounded up to 5 groups (40); every other grouped
    # width too (56 -> 84 -> 88), widths without groups keep round(C * 1.5)
    student = make_student(arch, {})
    model = timm_gpd.GPDModel(student, ratio=1.5, cbr=False)  # construction checks exactness
    assert model.widths[24] == 40 and model.widths[56] == 88 and model.widths[32] == 48
    if arch == 'regnety_002':
        assert model.widths[6] == 9  # an SE width: no groups, no rounding
    conv = model.teacher.get_submodule('s1.b1.conv2.conv')
    assert (conv.in_channels, conv.out_channels, conv.groups) == (40, 40, 5)
    for m in model.teacher.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels % m.groups == 0 and m.in_channels // m.groups == 8
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_same_function(student.eval()(x), model.eval()(x, mode='teacher'))
    # an integer ratio always adds whole groups: nothing is rounded
    assert timm_gpd.GPDModel(student, ratio=2, cbr=False).widths[24] == 48


def test_global_response_norm_refuses_fractional_ratio():
    # ConvNeXt-V2's LayerNorms refuse first: check GRN on its own
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), GlobalResponseNorm(4, channels_last=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r'^1 \(GlobalResponseNorm\).*integer gpd_ratio'):
        plan_expansion(net, 1.5)
    with torch.no_grad():
        net[1].weight.normal_()
    timm_gpd.inverse_reparameterize(net, ratio=3)  # exact (checked) with 3 copies of each channel


# Families whose forward lays channels out by a fixed head count or splits them into groups that
# channel segments of copies cannot follow: refused up front, naming the block (smallest timm
# variant of each, default kwargs)
UNSUPPORTED = [
    ('nest_tiny', 'Attention'),
    ('coat_tiny', 'ConvRelPosEnc'),
    ('edgenext_xx_small', 'SplitTransposeBlock'),
]


@pytest.mark.parametrize('arch,block', UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_family_is_refused_naming_the_block(arch, block):
    model = timm.create_model(arch, num_classes=10)
    with pytest.raises(NotImplementedError, match=rf'\({block}\) .*inverse reparameterization does not support it'):
        plan_expansion(model, 2)


# Families with module types that hold tensors and have no rule (yet): refused naming the module
NO_RULE = [
    ('efficientvit_m0', 'CascadedGroupAttention'),
]


@pytest.mark.parametrize('arch,module', NO_RULE, ids=[u[0] for u in NO_RULE])
def test_family_without_rule_is_refused_naming_the_module(arch, module):
    model = timm.create_model(arch, num_classes=10)
    with pytest.raises(NotImplementedError, match=rf'\.{module}\) has tensors of its own and no inverse reparam'):
        plan_expansion(model, 2)


def test_forward_that_fails_in_the_dt_is_a_clear_refusal():
    # a block that splits by a fixed count with no rule: the DT's own shape error is reported as
    # the reason, not raised raw
    class _FixedSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            a, b = torch.split(self.conv(x), [4, 4], dim=1)
            return a * b

    net = nn.Sequential(nn.Conv2d(3, 8, 3), _FixedSplit(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(NotImplementedError, match=r'^The dynamic teacher fails in its forward \(RuntimeError: split'):
        timm_gpd.inverse_reparameterize(net, ratio=2)


def test_check_input_grows_until_the_stem_accepts_it():
    # Inception-v4's stem shrinks 32 px to nothing: the check input is the smallest size that runs
    from timm_gpd.reparam.widen import check_input
    stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2), nn.Conv2d(4, 4, 5, stride=2),
                         nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    assert check_input(stem, ('0',)).shape[-2:] == (64, 64)
    assert check_input(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), ('0',)).shape[-2:] == (32, 32)


class _SharedInplaceAct(nn.Module):
    """Supported: one in-place ReLU used twice, on two widths (as in DLA or torchvision blocks)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(2 * c, c, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x))))


class _Shuffle(nn.Module):
    """Reads its channels as a (C / 2, 2) grid and transposes it (a channel shuffle by reshapes): not followed."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        y = torch.cat([x, self.conv(x)], 1)
        b, c, h, w = y.shape
        return self.proj(y.view(b, c // 2, 2, h, w).transpose(1, 2).reshape(b, c, h, w))


def test_culprit_search_is_not_fooled_by_shared_or_inplace_activations():
    # the search compares what each module receives in the student and the DT: an in-place op
    # must not change what was recorded, and a module called twice is compared call by call
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), _SharedInplaceAct(4), _Shuffle(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(NotImplementedError, match=r'^2 \(_Shuffle\) combines channels'):
        timm_gpd.inverse_reparameterize(net, ratio=2)
