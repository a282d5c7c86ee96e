"""Test helpers for timm families: the tiny model of each family, non-trivial inits, GPD steps."""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GatedMlp, GroupNorm1
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock

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
def eva_unfused(**kwargs) -> nn.Module:
    """EVA with timm's non-fused attention path: under the TorchScript ONNX exporter the fused
    path hands scaled_dot_product_attention a traced ``is_causal`` tensor (stock timm fails too)."""
    model = timm.create_model('eva02_tiny_patch14_224', **kwargs)
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    return model


# Families covered by the per-family rules (tests at ratio 2, and 1.5 where it must be refused):
# the smallest variant with tiny dims, 32 px
NEW_FAMILIES = [
    # window attention with a relative position table (heads x r), shifted windows, patch merging
    ('swin', 'swin_tiny_patch4_window7_224',
     dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2), drop_path_rate=0.)),
    # cosine attention with per-head logit scale, position-bias MLP, separate q/v biases, post-norm
    ('swinv2', 'swinv2_tiny_window8_256',
     dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2), drop_path_rate=0.)),
    # head-major fused qkv with BatchNorm, per-head attention biases, attention downsampling
    ('levit', 'levit_128s', dict(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1))),
    # ScaledStdConv2d: weight standardization and fan-in gain compensated
    ('nfnet', 'test_nfnet', {}),
    # GroupNorm1 (PoolFormer), layer scale and res scale
    ('poolformer', MetaFormer, dict(
        depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
        norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None, use_mlp_head=False)),
    # GroupNorm1NoBias, StarReLU, Scale
    ('poolformerv2', MetaFormer, dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), norm_layers=GroupNorm1NoBias,
                                      use_mlp_head=False)),
    # talking-heads attention (Linears across heads), class attention, per-block layer scales, tokens
    ('cait', 'cait_xxs24_224', dict(img_size=32, patch_size=8, depth=2, depth_token_only=1, embed_dim=64, num_heads=2)),
    # relative position table, q/v biases, gamma_1/gamma_2
    ('beit', 'beit_base_patch16_224', dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)),
    # rotary embeddings, SwiGLU, layer scales
    ('eva', eva_unfused, dict(img_size=32, patch_size=8, depth=2)),
    # spatial-reduction attention with a fused k/v Linear
    ('pvt_v2', 'pvt_v2_b0', dict(depths=(1, 1, 1, 1))),
    # cross-covariance attention (per-head temperature), Fourier position encoding, class attention
    ('xcit', 'xcit_nano_12_p16_224', dict(img_size=32, depth=2)),
    # window and channel attention
    ('davit', 'davit_tiny', dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))),
]
# further families the same rules cover, tested at ratio 2 only (with and without CBR)
MORE_FAMILIES = [
    ('convit', 'convit_tiny', dict(img_size=32, patch_size=8, depth=2, local_up_to_layer=1)),  # gated positional attention
    ('fastvit', 'fastvit_t8', {}),  # its own LayerScale2d
    ('cpubone', 'cpubone_nano', {}),  # head-major conv attention, GroupNorm1
    ('maxxvit', 'test_coatnet', dict(img_size=32)),  # head-first qkv, RelPosBias
    ('efficientformerv2', 'efficientformerv2_s0', dict(img_size=32, depths=(1, 1, 1, 1))),  # talking heads over convs
    ('pit', 'pit_ti_224', dict(img_size=32, patch_size=8, stride=4, depth=(1, 1, 1))),  # [1, C, H, W] position embedding
    ('twins', 'twins_svt_small', dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))),
    ('vit_relpos', 'vit_relpos_small_patch16_224', dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)),
    ('swinv2_cr', 'swinv2_cr_tiny_224',  # meta-MLP position bias, V1-style patch merging
     dict(img_size=32, window_size=4, embed_dim=16, depths=(2, 1), num_heads=(1, 2), drop_path_rate=0.)),
]
FAMILIES = FAMILIES + NEW_FAMILIES + MORE_FAMILIES
FAMILY_IDS = [f[0] for f in FAMILIES]
# ratios each family is tested at (the families added with per-family rules: 2, and 1.5 when it
# must be refused, to keep the matrix fast)
FAMILY_RATIOS = {f[0]: (2, 3, 1.5) for f in FAMILIES}
FAMILY_RATIOS.update({f[0]: (2, 1.5) for f in NEW_FAMILIES})
FAMILY_RATIOS.update({f[0]: (2,) for f in MORE_FAMILIES})
# LayerNorm / GroupNorm / GRN over channels, weight standardization and LeViT's whole-head
# attention stay exact only with integer ratios
INTEGER_RATIO_ONLY = {
    'convnext', 'convnextv2', 'vit', 'deit_distilled', 'mlp_mixer', 'swin', 'swinv2', 'levit', 'nfnet',
    'poolformer', 'poolformerv2', 'cait', 'beit', 'eva', 'pvt_v2', 'xcit', 'davit'}
# no k x k stride-1 nn.Conv2d: CBR leaves the model as it is
NO_CBR_CONV = {'vit', 'deit_distilled', 'mlp_mixer', 'resmlp', 'swin', 'swinv2', 'levit', 'nfnet', 'poolformer',
               'poolformerv2', 'cait', 'beit', 'eva', 'convit', 'pit', 'vit_relpos', 'swinv2_cr', 'gmlp'}


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
    model = randomize_hidden(create(arch, kwargs))
    for m in model.modules():  # train-mode randomness would make DT and student differ by chance
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or (
        'Norm' in type(module).__name__)


@torch.no_grad()
def randomize_hidden(model: nn.Module) -> nn.Module:
    """Give random values to what a fresh timm model hides an exactness check behind.

    Zero or tiny inits (zero-init last BN gamma, layer scales of 1e-5, zero biases, GRN) switch
    branches off, constant norm affines (1, 0) cannot tell channels apart, and fresh BN statistics
    make eval-mode BN an identity: all of them would let a wrongly widened DT pass.
    """
    for p in model.parameters():
        if p.numel() and p.abs().max() < 1e-3:
            p.normal_(0, 0.5)
    for m in model.modules():
        if _is_norm(m):
            for name, p in m.named_parameters(recurse=False):
                if p.ndim == 1:  # affine scale / shift vectors (not e.g. a fused conv inside a norm-act)
                    p.uniform_(0.5, 1.5) if name in ('weight', 'gamma', 'scale') else p.normal_(0, 0.2)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
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


# ---- families whose blocks concatenate or split channels by count (channel segments)

# GhostNet stages (kernel, mid, out, SE ratio, stride) at width 0.5: a stride-1 block, a stride-2
# block with SE, a depthwise conv and a conv shortcut, and one with SE and an identity shortcut
TINY_GHOSTNET = [[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]], [[3, 72, 24, 0.25, 1]]]


def tiny_cspnet(stage_type: str = 'csp', **kwargs) -> nn.Module:
    """A two-stage CspNet: CrossStage ('csp', cspresnet-style bottlenecks, expand ratio 2, linear
    cross path) or CrossStage3 ('cs3', cs3darknet-style dark blocks)."""
    from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg
    if stage_type == 'csp':
        stages = CspStagesCfg(depth=(1, 2), out_chs=(32, 64), stride=(1, 2), expand_ratio=2., bottle_ratio=0.5,
                              cross_linear=True)
    else:
        stages = CspStagesCfg(depth=(1, 2), out_chs=(32, 64), stride=2, block_ratio=0.5, stage_type='cs3',
                              block_type='dark')
    cfg = CspModelCfg(stem=CspStemCfg(out_chs=16, kernel_size=3, stride=2, pool=''), stages=stages,
                      act_layer='silu' if stage_type == 'cs3' else 'leaky_relu')
    return CspNet(cfg, **kwargs)


def _ghostnet(version: str):
    def build(**kwargs) -> nn.Module:
        from timm.models.ghostnet import GhostNet
        return GhostNet(TINY_GHOSTNET, width=0.5, version=version, **kwargs)
    build.__name__ = f'ghostnet_{version}'
    return build


CONCAT_FAMILIES = [
    # dense blocks: every layer reads the concatenation of all earlier features
    ('densenet', 'densenet121', dict(growth_rate=8, block_config=(2, 2))),
    # primary features concatenated with their depthwise (cheap) transform; SE, residual adds
    ('ghostnet', _ghostnet('v1'), dict(drop_rate=0.)),  # functional dropout: masks differ by chance
    # + V2's gating branch (avg-pooled, interpolated) on the kept channels
    ('ghostnetv2', _ghostnet('v2'), dict(drop_rate=0.)),
    # CrossStage: expanded features split in halves, blocks on one, concatenated back
    ('cspnet', tiny_cspnet, dict(stage_type='csp')),
    # CrossStage3
    ('cs3darknet', tiny_cspnet, dict(stage_type='cs3')),
]
FAMILIES.extend(CONCAT_FAMILIES)
FAMILY_IDS.extend(f[0] for f in CONCAT_FAMILIES)
FAMILY_RATIOS.update({f[0]: (2, 1.5) for f in CONCAT_FAMILIES})
# more of them, at ratio 2 (with and without CBR): the smallest variants, fewer blocks where timm allows
MORE_CONCAT_FAMILIES = [
    ('dla', 'dla46x_c', {}),  # tree roots concatenate their children; grouped bottlenecks
    ('vovnet', 'ese_vovnet19b_slim_dw', {}),  # one-shot aggregation, effective SE
    ('res2net', 'res2net50_14w_8s', dict(layers=(1, 1, 1, 1))),  # split into scales of `width`
    ('resnest', 'resnest14d', dict(layers=(1, 1, 1, 1))),  # radix split, softmax across the splits
    ('sknet', 'skresnet18', dict(layers=(1, 1, 1, 1))),  # kernel paths over split inputs, stacked
    ('dpn', 'dpn48b', dict(k_sec=(1, 1, 1, 1))),  # residual and dense paths
    ('mobilevit', 'mobilevit_xxs', {}),  # input concatenated with the transformer's output
    ('mixnet', 'mixnet_s', {}),  # MixedConv2d: fixed-size channel groups per kernel size
    ('fasternet', 'fasternet_t0', {}),  # partial conv on the first channels
    ('mambaout', 'test_mambaout', {}),  # gate / identity / conv split of the hidden channels
    ('efficientvit_mit', 'efficientvit_b0', {}),  # multi-scale linear attention, head-major q/k/v
    ('gmlp', MlpMixer, dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=64, mlp_ratio=6,  # spatial gating
                            block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)),  # over halves of the channels
]
FAMILIES.extend(MORE_CONCAT_FAMILIES)
FAMILY_IDS.extend(f[0] for f in MORE_CONCAT_FAMILIES)
FAMILY_RATIOS.update({f[0]: (2,) for f in MORE_CONCAT_FAMILIES})
