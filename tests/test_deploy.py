"""Deployment parity: an extracted student deploys like any timm model (ONNX Runtime, timm's
reparameterize_model), and a GPDModel traces and compiles to what it computes eagerly."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import timm
import timm_gpd
from family_helpers import FAMILIES, FAMILY_IDS, TINY_REGNET, assert_same_function, make_student, sgd_steps
from timm_gpd.reparam.branches import CBRConv2d


@pytest.fixture(scope='module', params=FAMILIES, ids=FAMILY_IDS)
def extracted(request):
    """The student extracted from a GPD model (CBR branches merged) after a training step."""
    _, arch, kwargs = request.param
    model = timm_gpd.GPDModel(make_student(arch, kwargs), ratio=2)
    sgd_steps(model, torch.randn(8, 3, 32, 32), steps=1)
    return model.extract_student()


# the TorchScript-based exporter: torch's default (dynamo) exporter needs onnxscript
@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::DeprecationWarning', 'ignore::FutureWarning')
def test_onnx_runtime_matches_pytorch(extracted, tmp_path):
    import onnx  # the dev extra pins onnx and onnxruntime
    import onnxruntime as ort
    plain = extracted
    path = tmp_path / 'student.onnx'
    torch.onnx.export(
        plain, (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, input_names=['input'],
        output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}})
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    x = torch.randn(3, 3, 32, 32)  # another batch size than exported
    with torch.no_grad():
        expected = plain(x)
    got = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
    assert_same_function(expected, got)


def _tiny_byobnet(block_type: str) -> nn.Module:
    """A two-stage RepVGG ('rep') or MobileOne ('one') ByobNet: train-time multi-branch blocks that
    timm's reparameterize_model fuses; pretrained_cfg as timm gives its repvgg / mobileone models."""
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg
    cfg = ByoModelCfg(blocks=(ByoBlockCfg(type=block_type, d=1, c=16, s=1),
                              ByoBlockCfg(type=block_type, d=1, c=32, s=2, gs=1 if block_type == 'one' else 0)),
                      stem_type=block_type, stem_chs=16, num_features=0)
    model = make_student(lambda num_classes: ByobNet(cfg, num_classes=num_classes), {})
    model.pretrained_cfg = timm.models.get_pretrained_cfg(
        'repvgg_a0' if block_type == 'rep' else 'mobileone_s0').to_dict()
    return model


@pytest.mark.parametrize('block_type', ['rep', 'one'])
def test_reparameterize_model_fuses_extracted_student(block_type):
    """An extracted student deploys like the stock model: timm's reparameterize_model fuses its
    RepVGG / MobileOne branches, and the fused model computes what the GPD student does."""
    from timm.utils import reparameterize_model
    model = timm_gpd.GPDModel(_tiny_byobnet(block_type), ratio=2)
    sgd_steps(model, torch.randn(8, 3, 32, 32), steps=1)
    plain = model.extract_student()
    fused = reparameterize_model(plain)
    assert not any(isinstance(m, CBRConv2d) for m in plain.modules())
    # the branches are gone: one conv per block left
    assert len(fused.state_dict()) < len(plain.state_dict()) / 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_function(model.eval()(x), fused(x), rel=1e-5)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_gpd_model_builds_on_a_low_precision_student(dtype):
    """The construction check runs in fp32 on float copies; the DT and the student keep the dtype."""
    student = make_student('resnet18d', dict(layers=(1, 1, 1, 1))).to(dtype)
    model = timm_gpd.GPDModel(student, ratio=2)
    assert {p.dtype for p in model.parameters()} == {dtype}
    plain = model.extract_student()
    assert {p.dtype for p in plain.parameters()} == {dtype}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.float().eval()(x)
        err = (plain.float()(x) - reference).abs().max().item()
    # the branches were merged in low precision: a few of its units of rounding
    eps = torch.finfo(dtype).eps
    assert err <= 16 * eps * reference.abs().max().item(), err


def _not_channels_last(model: nn.Module):
    return [n for n, p in model.named_parameters()
            if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1
            and not p.is_contiguous(memory_format=torch.channels_last)]


def test_channels_last_is_kept_by_the_dt_and_the_extracted_student():
    student = make_student('resnet18d', dict(layers=(1, 1, 1, 1))).to(memory_format=torch.channels_last)
    assert student.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    model = timm_gpd.GPDModel(student, ratio=2)
    assert _not_channels_last(model.teacher) == []
    sgd_steps(model, torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), steps=1)
    plain = model.extract_student()
    assert _not_channels_last(plain) == []
    # and a contiguous student stays contiguous
    assert timm_gpd.GPDModel(make_student('resnet18d', dict(layers=(1, 1, 1, 1))), ratio=2) \
        .teacher.conv1[0].weight.is_contiguous()


class _Mode(nn.Module):
    """Binds GPDModel's mode: trace and compile take tensors, not the mode string."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, x):
        return self.model(x, mode=self.mode)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _gpd(family):
    """A GPDModel that exercises every path of the student view: CBR (a grouped one for RegNet),
    copy counts that differ between channels (ratio 1.5) or LayerNorm with layer scale."""
    if family == 'regnet':
        return timm_gpd.GPDModel(make_student('regnety_002', TINY_REGNET), ratio=1.5)
    return timm_gpd.GPDModel(make_student('convnext_atto', dict(depths=(1, 1, 1, 1), conv_mlp=False)), ratio=2)


def _check_against_eager(eager, other, other_params, x, training, mode):
    """``other`` (a traced / compiled module whose DT parameters are ``other_params``) gives
    eager's outputs and, in training, the same gradients on the DT's parameters."""
    eager.train(training)
    with torch.set_grad_enabled(training):
        ref, got = _outputs(eager(x, mode=mode)), _outputs(other(x))
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert_same_function(r, g, rel=1e-5)
    if not training:
        return
    grads = []
    for out, params in ((ref, dict(eager.named_parameters())), (got, other_params)):
        for p in params.values():
            p.grad = None
        sum(F.cross_entropy(o, torch.arange(o.shape[0]) % 10) for o in out).backward()
        grads.append({n: p.grad for n, p in params.items() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        # relative to the tensor's largest entry: inductor reorders sums (~1e-5 relative)
        err = (grads[1][name] - g).abs().max().item()
        assert err <= 1e-4 * g.abs().max().item() + 1e-8, f'{name}: max |grad diff| {err:.3g}'


@pytest.mark.filterwarnings('ignore::torch.jit.TracerWarning', 'ignore::DeprecationWarning', 'ignore::FutureWarning')
@pytest.mark.parametrize('family', ['regnet', 'convnext'])
def test_jit_trace_matches_eager(family):
    model = _gpd(family)
    x = torch.randn(8, 3, 32, 32)
    for training in (True, False):
        for mode in ('student', 'both'):
            model.train(training)
            # tracing runs the forward once: in training it updates the running statistics
            traced = torch.jit.trace(_Mode(model, mode), x, check_trace=False)
            _check_against_eager(model, traced, dict(model.named_parameters()), x, training, mode)
    # the traced graph reads the live DT weights, it did not copy them
    with torch.no_grad():
        before = traced(x)[0]
        for p in model.parameters():
            p.mul_(0.5)
        after = traced(x)[0]
        assert not torch.allclose(after, before)
        assert_same_function(model.eval()(x), after, rel=1e-5)


def _check_compile(backend, cases):
    model = _gpd('regnet')
    assert any(isinstance(m, CBRConv2d) and m.groups > 1 for m in model.student.modules())
    x = torch.randn(8, 3, 32, 32)
    twin = copy.deepcopy(model)  # the compiled copy, so running statistics can be compared
    torch._dynamo.reset()  # count this test's graphs only
    counters.clear()
    for training, mode in cases:
        twin.train(training)
        # plain torch.compile, as users call it (fullgraph=True would capture data-dependent
        # ops instead of breaking the graph there, and so hide the breaks users would get)
        compiled = torch.compile(_Mode(twin, mode), backend=backend)
        _check_against_eager(model, compiled, dict(twin.named_parameters()), x, training, mode)
    # one graph per case: no break anywhere in the student view, CBR merge or DT
    assert not counters['graph_break'], list(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == len(cases)
    for (name, a), b in zip(model.student.named_buffers(), twin.student.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f'{name}: {m}')


ALL_CASES = [(training, mode) for training in (True, False) for mode in ('student', 'both')]


def test_compile_matches_eager():
    # aot_eager captures the forward and backward graphs that inductor compiles, without the
    # C++ build; each graph takes seconds to capture, so two cases that together run every
    # path (training: student and DT with running-statistics updates; eval: the deployed student)
    _check_compile('aot_eager', [(True, 'both'), (False, 'student')])


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    _check_compile('inductor', ALL_CASES)
