"""Test helpers for timm families: the tiny model of each family, non-trivial inits, GPD steps."""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

from timm_gpd.reparam.widen import max_logit_error

# A RegNet small enough for CPU tests whose widths (16, 32, 64, 128) are multiples of 16, so
# that ratio 1.5 adds whole groups of 8; stage 3 has a second block with a stride-1 grouped
# 3x3 conv (a grouped CBR conv).
TINY_REGNET = dict(depth=5, w0=16, wa=24, wm=2, group_size=8)

# (id, timm model or class, kwargs): the smallest variant of each family, fewer blocks where timm allows
FAMILIES = [
    # SE, depthwise convs, BatchNormAct2d, SiLU
    ('efficientnet', 'efficientnet_b0', {}),
    # SE with hard-sigmoid, hard-swish, 1x1 head conv after the pooling, timm Linear head
    ('mobilenetv3', 'mobilenetv3_small_050', {}),
    # LayerNorm2d stem / downsamples, depthwise 7x7, channels-last LayerNorm + Linear MLP (as in
    # convnext_tiny and up), per-block `gamma` layer scale
    ('convnext', 'convnext_atto', dict(depths=(1, 1, 1, 1), conv_mlp=False)),
    # 1x1-conv MLP with GlobalResponseNorm, no layer scale
    ('convnextv2', 'convnextv2_atto', dict(depths=(1, 1, 1, 1))),
    # grouped convs, SE
    ('regnet', 'regnety_002', TINY_REGNET),
    # deep stem, avg-pool downsample
    ('resnet_d', 'resnet18d', dict(layers=(1, 1, 1, 1))),
    # q/k LayerNorm over head_dim, LayerScale, register tokens
    ('vit', 'vit_tiny_patch16_224',
     dict(depth=2, img_size=32, patch_size=8, qk_norm=True, init_values=1e-5, reg_tokens=2)),
    # class and distillation tokens, two heads
    ('deit_distilled', 'deit_tiny_distilled_patch16_224', dict(depth=2, img_size=32, patch_size=8)),
    # token-mixing MLPs (timm's mixer_* / resmlp_* entrypoints fix the depth: the class itself)
    ('mlp_mixer', MlpMixer, dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=64)),
    # + Affine 'norms' and layer scales
    ('resmlp', MlpMixer,
     dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4)),
]
FAMILY_IDS = [f[0] for f in FAMILIES]
# LayerNorm / GRN over channels stays exact only with integer ratios
INTEGER_RATIO_ONLY = {'convnext', 'convnextv2', 'vit', 'deit_distilled', 'mlp_mixer'}
# no k x k stride-1 conv: CBR leaves the model as it is
NO_CBR_CONV = {'vit', 'deit_distilled', 'mlp_mixer', 'resmlp'}


def create(arch, kwargs):
    """A fresh model: a timm model name, or a timm model class."""
    if isinstance(arch, str):
        return timm.create_model(arch, num_classes=10, **kwargs)
    return arch(num_classes=10, **kwargs)


def make_student(arch, kwargs, seed=0):
    """A timm model whose every parameter and statistic matters at init.

    Zero or tiny inits (zero-init last BN gamma, GRN, ConvNeXt's 1e-6 layer scale, biases) would
    hide whole branches from an exactness check, and fresh BN statistics make eval-mode BN an
    identity: give them random values.
    """
    torch.manual_seed(seed)
    model = create(arch, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() < 1e-3:
                p.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def assert_same_function(reference, other, rel=1e-4):
    err, tol = max_logit_error(reference, other)
    assert err <= tol * rel / 1e-4, f'max |diff| {err:.3g} > {tol * rel / 1e-4:.3g}'


def sgd_steps(model, x, steps=2):
    """A few GPD steps (DT and student losses on the shared weights), as in training."""
    y = torch.arange(x.shape[0]) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(steps):
        student, teacher = model(x, mode='both')
        loss = F.cross_entropy(student, y) + F.cross_entropy(teacher, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return model
