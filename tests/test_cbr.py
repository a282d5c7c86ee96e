"""Channel-Branch Reparameterization: merging, both execution paths, inits, cbr-only mode."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_gpd
from timm_gpd.reparam.branches import BRANCHES, CBRConv2d, convert_to_cbr, is_cbr_candidate
from timm_gpd.reparam.expansion import ChannelMap


def _random_branches(m: CBRConv2d, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _branch_outputs(m: CBRConv2d, x):
    """The five branches run literally on the activations (the definition of the module)."""
    def conv(inp, w, groups=m.groups):
        return nn.functional.conv2d(inp, w, None, m.stride, m.padding, m.dilation, groups)
    s = m.scales[:, None, :, None, None]
    out = s[0] * conv(x, m.weight)
    avg = m.w_avg[..., None, None] * m.avg_kernel
    out = out + s[1] * conv(x, avg)
    out = out + s[2] * conv(x, m.w_prior[..., None, None] * m.prior_kernel)
    mixed = nn.functional.conv2d(x, (m.mixer + m.mixer_identity)[..., None, None], groups=m.groups)
    out = out + s[3] * conv(mixed, m.w_kxk)
    dw = conv(x, m.w_dw[:, None], m.in_channels)
    out = out + s[4] * nn.functional.conv2d(dw, m.w_pw[..., None, None], groups=m.groups)
    return out if m.bias is None else out + m.bias[None, :, None, None]


# every branch alone merged, all merged, none merged (origin on the activations too), origin alone
PLANS = [frozenset(), frozenset({'origin'}), frozenset(BRANCHES)] + [frozenset({'origin', b}) for b in BRANCHES[1:]]
CONV_SHAPES = [  # (groups, cin, cout, kernel, stride, padding, dilation, bias)
    (1, 6, 5, 3, 1, 1, 1, True),
    (2, 6, 4, 3, 1, 1, 1, False),
    (6, 6, 6, 3, 1, 1, 1, True),
    (3, 6, 9, (3, 5), (2, 1), (0, 2), 1, True),
    (1, 4, 4, 3, 1, 2, 2, True),
    (2, 4, 6, (5, 3), 2, 'valid', (1, 2), False),
    (1, 4, 3, 3, 1, 'same', 2, True),
]
# a 1x1 map (the last stage at 32 px): a single kernel tap meets the input
SINGLE_POSITION = [
    (1, 4, 5, 3, 1, 1, 1, True),
    (4, 4, 4, 3, 1, 1, 1, False),
    (2, 4, 6, (3, 5), 2, (2, 4), 2, True),
    (1, 4, 3, 3, 1, 'same', 2, True),
    (1, 4, 3, 2, 1, 1, 2, True),  # 2x2 kernel, padding 1, dilation 2: no tap meets it, only the bias remains
]


@pytest.mark.parametrize('groups,cin,cout,k,stride,padding,dilation,bias,size',
                         [(*s, (7, 8)) for s in CONV_SHAPES] + [(*s, (1, 1)) for s in SINGLE_POSITION])
def test_every_plan_computes_the_branches_and_their_gradients(groups, cin, cout, k, stride, padding, dilation, bias,
                                                              size):
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
    m = _random_branches(CBRConv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups, bias))
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    m.double()
    reference = _branch_outputs(m, x)
    g_out = torch.randn_like(reference)
    ref_grads = torch.autograd.grad(reference, [x, *m.parameters()], g_out)
    for plan in PLANS:
        out = m(x, merge=plan)
        torch.testing.assert_close(out, reference, msg=f'plan {sorted(plan)}')
        grads = torch.autograd.grad(out, [x, *m.parameters()], g_out)
        for (name, _), g, r in zip([('input', x), *m.named_parameters()], grads, ref_grads):
            torch.testing.assert_close(g, r, msg=f'plan {sorted(plan)}: gradient of {name}')
    torch.testing.assert_close(m.to_conv()(x), reference)


def test_cost_model_runs_branches_on_small_maps_and_merges_on_large():
    m = CBRConv2d.from_conv(nn.Conv2d(512, 512, 3, padding=1))
    assert m.plan(torch.empty(2, 512, 1, 1)) == frozenset()
    assert m.plan(torch.empty(32, 512, 28, 28)) == frozenset(BRANCHES)


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


def _tiny_gpd_run(steps=3):
    """A few fixed-seed GPD steps (SGD, clipping, DT loss) on a tiny ResNet with CBR: the losses,
    per parameter kind the squared norm of the update and its projection on a fixed random
    direction, and the extracted student's logits."""
    from timm_gpd.losses import DynamicTeacherKD
    from timm_gpd.task import TrainTask
    torch.manual_seed(0)
    model = timm_gpd.GPDModel(timm.create_model('test_resnet', num_classes=10), ratio=2.0, seed=0)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    task = TrainTask(model, opt, nn.CrossEntropyLoss(label_smoothing=0.1), dynamic_teacher=True,
                     dt_loss=DynamicTeacherKD(), clip_grad=5.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        parts = task.step(x, y)
        losses.append([parts[k].item() for k in ('student_ce', 'student_dt', 'dt_ce', 'loss')])
    moved, pg = {}, torch.Generator().manual_seed(2)
    for n, p in model.named_parameters():
        d = (p.detach() - init[n]).double()
        acc = moved.setdefault(n.rsplit('.', 1)[-1], [0.0, 0.0])
        acc[0] += d.square().sum().item()
        acc[1] += (d * torch.randn(d.shape, generator=pg, dtype=torch.float64)).sum().item()
    with torch.no_grad():
        logits = model.extract_student()(torch.randn(2, 3, 32, 32, generator=g))
    return losses, moved, logits


# Recorded with the code before the per-branch cost model and the shared student views
# (commit 18c2ed3): merging everything or running mix_kxk on the activations, and autograd's
# slice backward for every student view.
REFERENCE_LOSSES = [
    [2.29024076461792, -1.6212283071581624e-07, 2.29024076461792, 4.58048152923584],
    [2.4500176906585693, 0.0323311910033226, 2.4127743244171143, 4.895123481750488],
    [2.5609130859375, 0.12400597333908081, 2.5027072429656982, 5.187626361846924]]
REFERENCE_MOVED = {
    'weight': [1.4006328680624731, -0.27967994062053403], 'bias': [0.006876660038816711, -0.0019882102990880536],
    'w_avg': [0.00440756844208039, 0.1212913079422568], 'w_prior': [7.059950329068259e-05, 0.006285965126479828],
    'mixer': [0.2563820530117306, 1.6997811962034937], 'w_kxk': [1.068421838983644, 0.026249058165750537],
    'w_dw': [0.0005167920294044169, -0.003380541849053928], 'w_pw': [0.0021446463272115366, -0.001912454379470478],
    'scales': [0.0919216225296559, 0.0026946734449377905]}
REFERENCE_LOGITS = [
    [0.00181632861495018, 0.1705196350812912, -0.08211921900510788, -0.08714131265878677, -0.09900864958763123,
     0.005278356373310089, 0.2537669539451599, -0.22513447701931, 0.010604064911603928, 0.03420737385749817],
    [0.014367125928401947, 0.17643260955810547, -0.05616902559995651, -0.0960797592997551, -0.08439110219478607,
     0.008797707036137581, 0.2516300082206726, -0.23194628953933716, -0.0028872638940811157, 0.023908689618110657]]


@pytest.mark.parametrize('plan', ['cost_model', 'merge_all', 'merge_none'])
def test_training_steps_and_extracted_student_match_the_recorded_run(plan, monkeypatch):
    if plan != 'cost_model':
        chosen = frozenset(BRANCHES) if plan == 'merge_all' else frozenset()
        monkeypatch.setattr(CBRConv2d, 'plan', lambda self, x: chosen)
    losses, moved, logits = _tiny_gpd_run()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(REFERENCE_LOSSES), rtol=1e-5, atol=1e-6)
    assert moved.keys() == REFERENCE_MOVED.keys()
    for kind, (sq, proj) in moved.items():
        # the update of each kind of parameter: its size and its direction
        assert sq == pytest.approx(REFERENCE_MOVED[kind][0], rel=1e-4), kind
        # the projection is a sum of cancelling terms: its rounding scales with the update's norm
        assert abs(proj - REFERENCE_MOVED[kind][1]) <= 2e-4 * REFERENCE_MOVED[kind][0] ** 0.5, kind
    torch.testing.assert_close(logits, torch.tensor(REFERENCE_LOGITS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('rows,cols', [
    (ChannelMap.single(4, 2.0), ChannelMap.single(3, 2.0)),  # uniform copies
    (ChannelMap.single(4, 1.5), ChannelMap.single(3, 1.5)),  # copy counts differ between channels
    (ChannelMap.segmented(2, 3, 1.5), ChannelMap.identity(3)),  # fused q/k/v rows
])
def test_shared_tensor_gives_the_gradients_of_separate_views(rows, cols):
    from timm_gpd.reparam.expansion import COPY, MIX, TensorPlan, shared_tensor, student_view
    plan = TensorPlan(((0, rows, COPY), (1, cols, MIX)))
    wide = torch.randn(rows.wide_size, cols.wide_size, 3, dtype=torch.float64, requires_grad=True)
    g_wide, g_student = torch.randn(wide.shape, dtype=torch.float64), torch.randn(rows.size, cols.size, 3, dtype=torch.float64)
    separate = torch.autograd.grad([wide * 1.0, student_view(wide, plan)], wide, [g_wide, g_student])[0]
    dt, student = shared_tensor(wide, plan)
    torch.testing.assert_close(student, student_view(wide, plan), rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad([dt, student], wide, [g_wide, g_student])[0], separate)
    # only the student's view used: the DT's gradient is zero outside the primary block
    _, student = shared_tensor(wide, plan)
    torch.testing.assert_close(torch.autograd.grad(student, wide, g_student)[0],
                               torch.autograd.grad(student_view(wide, plan), wide, g_student)[0])


@pytest.mark.parametrize('rows,cols', [
    (ChannelMap.single(4, 2.0), ChannelMap.single(3, 2.0)),
    (ChannelMap.single(4, 1.5), ChannelMap.single(3, 1.5)),  # copy counts 1 or 2 per input channel
])
def test_decoupled_student_gradient_moves_its_view_at_the_plain_lr(rows, cols):
    """ decoupled: the student's own gradient changes its view by exactly -lr x that gradient under
    SGD (the coupled view moves by copies**2 times it); the DT's gradient is untouched. """
    from timm_gpd.reparam.expansion import COPY, MIX, TensorPlan, shared_tensor, student_view
    plan = TensorPlan(((0, rows, COPY), (1, cols, MIX)))
    wide = torch.randn(rows.wide_size, cols.wide_size, dtype=torch.float64, requires_grad=True)
    g_wide, g_student = torch.randn(wide.shape, dtype=torch.float64), torch.randn(rows.size, cols.size, dtype=torch.float64)
    lr = 0.1
    moves = {}
    for decoupled in (False, True):
        dt, student = shared_tensor(wide, plan, decoupled)
        torch.testing.assert_close(student, student_view(wide, plan), rtol=0, atol=0)
        only_student = torch.autograd.grad(student, wide, g_student)[0]
        moves[decoupled] = student_view(wide - lr * only_student, plan) - student_view(wide, plan)
        dt, student = shared_tensor(wide, plan, decoupled)
        only_dt = torch.autograd.grad(dt, wide, g_wide)[0]
        torch.testing.assert_close(only_dt, g_wide, rtol=0, atol=0)
    torch.testing.assert_close(moves[True], -lr * g_student)
    copies = cols.copies().double()
    torch.testing.assert_close(moves[False], -lr * g_student * copies ** 2)
    assert not torch.allclose(moves[True], moves[False])


def test_decoupled_student_in_a_gpd_model():
    """ GPDModel(decouple_student=True): the same forward, the DT loss's gradient unchanged, the
    student loss's gradient divided by copies**2 on conv weights (mixed input channels) only. """
    import timm
    import timm_gpd
    torch.manual_seed(0)
    student = timm.create_model('test_resnet', num_classes=5, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    grads, outputs = {}, {}
    for decoupled in (False, True):
        model = timm_gpd.GPDModel(student, ratio=2.0, decouple_student=decoupled).train()
        zs, zd = model(x, mode='both')
        outputs[decoupled] = (zs.detach(), zd.detach())
        params = dict(model.named_parameters())
        g_s = torch.autograd.grad(zs.square().sum(), list(params.values()), retain_graph=True, allow_unused=True)
        g_d = torch.autograd.grad(zd.square().sum(), list(params.values()), allow_unused=True)
        grads[decoupled] = {name: (a, b) for name, a, b in zip(params, g_s, g_d)}
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    scaled = 0
    for name, (g_s, g_d) in grads[True].items():
        ref_s, ref_d = grads[False][name]
        if g_d is not None:
            torch.testing.assert_close(g_d, ref_d, rtol=0, atol=0)
        if g_s is None:
            continue
        plan = model._shared[name.replace('teacher.', '', 1)]
        factor = 4.0 if plan is not None and plan.mix_dim is not None else 1.0
        torch.testing.assert_close(g_s * factor, ref_s, rtol=1e-5, atol=1e-7)
        scaled += factor != 1.0
    assert scaled > 0


@pytest.mark.parametrize('groups', [1, 8])
@pytest.mark.parametrize('size', [(1, 1), (6, 6)])
def test_every_plan_keeps_the_conv_dtype_under_autocast(groups, size):
    m = CBRConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=groups))
    x = torch.randn(2, 8, *size)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected = nn.functional.conv2d(x, m.weight, m.bias, 1, 1, 1, groups).dtype
        for plan in PLANS:
            assert m(x, merge=plan).dtype == expected == torch.bfloat16, sorted(plan)
