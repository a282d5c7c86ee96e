"""Channel-Branch Reparameterization: merging, both execution paths, inits, cbr-only mode."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_gpd
from timm_gpd.reparam.branches import CBRConv2d, convert_to_cbr, is_cbr_candidate


def _random_branches(m: CBRConv2d, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _branch_outputs(m: CBRConv2d, x):
    """The five branches run literally on the activations (the definition of the module)."""
    conv = lambda inp, w, groups=m.groups: nn.functional.conv2d(inp, w, None, 1, m.padding, m.dilation, groups)
    kh, kw = m.kernel_size
    s = m.scales[:, None, :, None, None]
    out = s[0] * conv(x, m.weight)
    avg = m.w_avg[..., None, None] * m.avg_kernel
    out = out + s[1] * conv(x, avg)
    out = out + s[2] * conv(x, m.w_prior[..., None, None] * m.prior_kernel)
    mixed = nn.functional.conv2d(x, (m.mixer + m.mixer_identity)[..., None, None], groups=m.groups)
    out = out + s[3] * conv(mixed, m.w_kxk)
    dw = nn.functional.conv2d(x, m.w_dw[:, None], None, 1, m.padding, m.dilation, m.in_channels)
    out = out + s[4] * nn.functional.conv2d(dw, m.w_pw[..., None, None], groups=m.groups)
    return out + m.bias[None, :, None, None]


@pytest.mark.parametrize('groups,cin,cout', [(1, 6, 5), (2, 6, 4), (6, 6, 6)])
def test_merged_kernel_equals_branches_and_both_paths_agree(groups, cin, cout):
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    m = _random_branches(CBRConv2d.from_conv(conv, 'scratch'))
    x = torch.randn(2, cin, 7, 7)
    reference = _branch_outputs(m, x)
    torch.testing.assert_close(m(x, merge=True), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(x, merge=False), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.to_conv()(x), reference, rtol=1e-4, atol=1e-4)


def test_cost_model_picks_activations_for_small_maps_and_merging_for_large():
    m = CBRConv2d.from_conv(nn.Conv2d(512, 512, 3, padding=1))
    assert not m.merge_is_cheaper(torch.empty(2, 512, 1, 1))
    assert m.merge_is_cheaper(torch.empty(32, 512, 28, 28))


def test_finetune_init_preserves_a_pretrained_function_exactly():
    student = timm.create_model('resnet18', num_classes=10).eval()
    converted = timm.create_model('resnet18', num_classes=10).eval()
    converted.load_state_dict(student.state_dict())
    paths = convert_to_cbr(converted, init='finetune')
    assert 'layer1.0.conv1' in paths and 'conv1' not in paths  # the stride-2 stem stays plain
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), student(x), rtol=0, atol=1e-6)


def test_gpd_finetune_student_equals_pretrained_student():
    student = timm.create_model('resnet18', num_classes=10).eval()
    model = timm_gpd.GPDModel(student, ratio=2, cbr_init='finetune').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), student(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x, mode='teacher'), student(x), rtol=0, atol=1e-4)


def test_only_plain_stride1_kxk_convs_are_candidates():
    assert is_cbr_candidate(nn.Conv2d(4, 4, 3, padding=1))
    assert not is_cbr_candidate(nn.Conv2d(4, 4, 1))
    assert not is_cbr_candidate(nn.Conv2d(4, 4, 3, stride=2))
    assert not is_cbr_candidate(nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    from timm.layers import StdConv2d
    assert not is_cbr_candidate(StdConv2d(4, 4, 3))


def test_cbr_only_mode_has_no_teacher_and_extracts():
    torch.manual_seed(0)
    model = timm.create_model('gpd_resnet18', num_classes=10, gpd_cbr_only=True)
    assert not model.has_teacher
    with pytest.raises(ValueError, match='cbr_only'):
        model.forward_both(torch.randn(1, 3, 32, 32))
    student_params = sum(p.numel() for p in timm.create_model('resnet18', num_classes=10).parameters())
    assert sum(p.numel() for p in model.parameters()) > student_params
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    model(x).logsumexp(1).mean().backward()
    opt.step()
    model.eval()
    stock = timm.create_model('resnet18', num_classes=10)
    stock.load_state_dict(model.extract_student().state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_bad_cbr_init_is_refused():
    with pytest.raises(ValueError, match='cbr_init'):
        timm.create_model('gpd_resnet18', num_classes=10, gpd_cbr_init='pretrained')
