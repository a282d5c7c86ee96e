"""Channel segments traced through the student's forward (timm_gpd.reparam.spaces): concatenations
and splits by count widen exactly, anything they cannot lay out is refused naming the module, and
models without them keep the single copy-major layout."""
import pytest
import torch
import torch.nn as nn

import timm_gpd
from family_helpers import assert_same_function, make_student, randomize_hidden
from timm_gpd.reparam.spaces import trace_channel_spaces
from timm_gpd.reparam.widen import plan_expansion


class _Cat(nn.Module):
    """cat([x, conv(x)]) -> norm -> 1x1 conv, plus a residual add of the concatenation."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c + 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * c + 2)
        self.skip = nn.Conv2d(c, 2 * c + 2, 1)
        self.proj = nn.Conv2d(2 * c + 2, c, 1)

    def forward(self, x):
        y = self.bn(torch.cat([x, self.conv(x)], 1)) + self.skip(x)
        return self.proj(torch.relu(y))


class _Split(nn.Module):
    """A split by count (the count an attribute the DT scales), each part its own conv."""

    def __init__(self, c):
        super().__init__()
        self.first = c // 2
        self.expand = nn.Conv2d(c, c, 1)
        self.a = nn.Conv2d(self.first, self.first, 3, padding=1, groups=self.first)
        self.b = nn.Conv2d(c - self.first, c - self.first, 1)

    def forward(self, x):
        a, b = self.expand(x).split([self.first, x.shape[1] - self.first], dim=1)
        return torch.cat([self.a(a), self.b(b)], 1) + x


def _net(block, c=6):
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), block, nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 10))


def test_concatenation_is_traced_into_segments():
    net = randomize_hidden(_net(_Cat(6)))
    spaces = trace_channel_spaces(net.eval(), torch.randn(1, 3, 16, 16))
    assert spaces.inputs('2.bn') == (6, 8) and spaces.inputs('2.proj') == (6, 8)
    # the residual add lays the skip conv's output out like the concatenation
    assert spaces.outputs('2.skip') == (6, 8)
    assert spaces.inputs('2.conv') == (6,) and spaces.outputs('0') == (6,)


@pytest.mark.parametrize('ratio', [2, 3, 1.5])
def test_concatenation_widens_exactly(ratio):
    net = randomize_hidden(_net(_Cat(6)))
    model = timm_gpd.GPDModel(net, ratio=ratio, cbr=False)  # construction checks exactness
    proj = model.teacher.get_submodule('2.proj')
    assert proj.in_channels == model.widths[6] + model.widths[8]  # each part widened on its own
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_same_function(net.eval()(x), model.eval()(x, mode='teacher'))
        assert_same_function(net(x), model(x))


class _SplitRule:
    """The rule a block that splits by an attribute count registers: the DT splits at the
    width of the first segment."""

    def __call__(self, m, ctx):
        from timm_gpd.reparam.rules import ModulePlan
        cmap = ctx.channels(m.expand.out_channels, sizes=ctx.spaces[ctx.path + '.expand'][1])
        return ModulePlan(attrs={'first': ctx.wide_position(cmap, m.first, 'splits')})


def test_split_by_count_widens_exactly_with_its_rule():
    from timm_gpd.reparam.rules import follows_segments, register_rule
    register_rule(_Split)(follows_segments(_SplitRule()))
    net = randomize_hidden(_net(_Split(6)))
    spaces = trace_channel_spaces(net.eval(), torch.randn(1, 3, 16, 16))
    # the split cuts the expand conv's output; the residual add cuts the block's input (the stem) too
    assert spaces.outputs('2.expand') == (3, 3) and spaces.outputs('0') == (3, 3)
    model = timm_gpd.GPDModel(net, ratio=2)
    assert model.teacher.get_submodule('2').first == 6
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_same_function(*model.eval()(x, mode='both'))


class _CatThenGroupNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.norm = nn.GroupNorm(2, 2 * c)
        self.proj = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return self.proj(self.norm(torch.cat([x, self.conv(x)], 1)))


def test_rule_that_lays_channels_out_as_one_block_refuses_segments():
    with pytest.raises(NotImplementedError, match=r'^2\.norm \(GroupNorm\) sees channels concatenated or split '
                                                  r'by count \(parts of \[6, 6\] channels\)'):
        plan_expansion(_net(_CatThenGroupNorm(6)), 2)


class _GroupedOverCat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c + 2, 1)
        self.grouped = nn.Conv2d(2 * c + 2, 2 * c + 2, 3, padding=1, groups=2)  # groups of 7 | 3 + 4

    def forward(self, x):
        return self.grouped(torch.cat([x, self.conv(x)], 1))[:, :x.shape[1]]


def test_cut_inside_a_group_is_refused():
    with pytest.raises(NotImplementedError, match=r'^2\.grouped \(Conv2d\): a concatenation or split at channel 6 '
                                                  r'falls inside one of its groups'):
        plan_expansion(_net(_GroupedOverCat(6)), 2)


def test_models_without_concatenation_keep_one_segment_everywhere():
    student = make_student('resnet18d', dict(layers=(1, 1, 1, 1)))
    spaces = trace_channel_spaces(student.eval(), torch.randn(1, 3, 32, 32))
    assert spaces.io and not spaces.errors
    assert all(s is None or len(s) == 1 for io in spaces.io.values() for s in io)


class _CatOnly(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c + 2, 1)

    def forward(self, x):
        return torch.cat([x, self.conv(x)], 1)


class _ShuffleAfterCat(nn.Module):
    """Reads a concatenation (exactly), then shuffles its channels by reshapes (not followed)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        return self.proj(y.view(b, c // 2, 2, h, w).transpose(1, 2).reshape(b, c, h, w))


def test_culprit_search_reads_segmented_inputs_at_their_primary_positions():
    # the shuffle block's input is a concatenation: the DT's first channels are not the student's,
    # so only reading each segment's primary positions finds the shuffle, not the block before it
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _CatOnly(6), _ShuffleAfterCat(14), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(14, 10))
    with pytest.raises(NotImplementedError, match=r'^2 \(_ShuffleAfterCat\) combines channels'):
        timm_gpd.inverse_reparameterize(randomize_hidden(net), ratio=2)
