"""GPDModel as a timm model: weight-decay and layer-decay groups, features / head, classifier reset,
gradient checkpointing, SyncBatchNorm conversion."""
import pytest
import timm
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import timm_gpd  # noqa: F401  (registers the gpd_* entrypoints)

DEIT = dict(num_classes=10, img_size=32, in_chans=1)


@pytest.fixture(scope='module')
def gpd_deit():
    torch.manual_seed(0)
    return timm.create_model('gpd_deit_tiny_patch16_224', **DEIT)


@pytest.fixture(scope='module')
def stock_deit():
    return timm.create_model('deit_tiny_patch16_224', **DEIT)


def _groups_by_name(optimizer, model, prefix=''):
    """{parameter name without prefix: (weight_decay, lr_scale)} of every optimized tensor."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)][len(prefix):]: (g['weight_decay'], g.get('lr_scale', 1.0))
            for g in optimizer.param_groups for p in g['params']}


def test_weight_decay_groups_match_stock_deit(gpd_deit, stock_deit):
    assert gpd_deit.no_weight_decay() == {'teacher.' + n for n in stock_deit.no_weight_decay()}
    gpd = _groups_by_name(create_optimizer_v2(gpd_deit, 'adamw', lr=1e-3, weight_decay=0.05), gpd_deit, 'teacher.')
    stock = _groups_by_name(create_optimizer_v2(stock_deit, 'adamw', lr=1e-3, weight_decay=0.05), stock_deit)
    # the DT holds every trained tensor under the stock model's names: each in the stock tensor's group
    assert gpd == stock
    assert stock['pos_embed'][0] == stock['cls_token'][0] == 0. and stock['blocks.0.attn.qkv.weight'][0] == 0.05


def test_layer_decay_groups_match_stock_deit(gpd_deit, stock_deit):
    kwargs = dict(lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    gpd_opt = create_optimizer_v2(gpd_deit, 'adamw', **kwargs)
    stock_opt = create_optimizer_v2(stock_deit, 'adamw', **kwargs)
    assert len(gpd_opt.param_groups) == len(stock_opt.param_groups) > 2
    assert _groups_by_name(gpd_opt, gpd_deit, 'teacher.') == _groups_by_name(stock_opt, stock_deit)


def test_features_head_and_num_features(gpd_deit):
    model = gpd_deit.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    assert model.num_features == 192 and model.pretrained_cfg['architecture'] == 'gpd_deit_tiny_patch16_224'


def _gpd_test_resnet(**kwargs):
    # timm's tiny ResNet: the code path of gpd_resnet18 at a fraction of the cost
    return timm_gpd.GPDModel(timm.create_model('test_resnet', in_chans=1, **kwargs))


def test_features_are_differentiable_into_the_dt():
    model = _gpd_test_resnet(num_classes=10)
    model.forward_features(torch.randn(2, 1, 32, 32)).sum().backward()
    stem = model.teacher.get_parameter('conv1.0.weight')
    assert stem.grad is not None and stem.grad.abs().sum() > 0


@pytest.mark.parametrize('arch, kwargs', [('test_resnet', dict(in_chans=1)), ('deit_tiny_patch16_224', DEIT)])
def test_reset_classifier_rebuilds_the_dt_head(arch, kwargs):
    torch.manual_seed(0)
    model = timm_gpd.GPDModel(timm.create_model(arch, **dict(kwargs, num_classes=10))).eval()
    model.reset_classifier(5)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        student, teacher = model(x), model(x, mode='teacher')
    assert student.shape == (2, 5) and model.num_classes == 5
    torch.testing.assert_close(teacher, student, rtol=1e-4, atol=1e-4)  # the new DT head is the widened student's
    plain = model.extract_student()
    timm.create_model(arch, **dict(kwargs, num_classes=5)).load_state_dict(plain.state_dict(), strict=True)
    # the new head is trained: one set of tensors, in the DT, each listed once
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
    with pytest.raises(NotImplementedError, match='rebuild it with num_classes=3'):
        model.reset_classifier(3)


def test_grad_checkpointing_trains_the_same(gpd_deit):
    model = gpd_deit.train()
    x = torch.randn(2, 1, 32, 32)

    def grads():
        model.zero_grad()
        torch.manual_seed(1)
        zs, zt = model(x, mode='both')
        (zs.square().sum() + zt.square().sum()).backward()
        return [p.grad.clone() for p in model.parameters()]
    plain = grads()
    model.set_grad_checkpointing(True)
    assert model.teacher.grad_checkpointing
    checkpointed = grads()
    model.set_grad_checkpointing(False)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_sync_batchnorm_conversion_of_a_gpd_model(load_script):
    train = load_script('train.py', 'train_for_sync_bn')
    torch.manual_seed(0)
    model = _gpd_test_resnet(num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x, mode='both')
    params = [id(p) for p in model.parameters()]
    converted = train.convert_sync_batchnorm(model)
    kinds = {type(m) for m in converted.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert [id(p) for p in converted.parameters()] == params  # the optimizer's tensors are the same ones
    assert not list(converted.student.parameters())  # the student's norms still read the DT's views
    with torch.no_grad():
        after = converted(x, mode='both')
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
