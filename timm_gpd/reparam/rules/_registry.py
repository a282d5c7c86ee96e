"""Inverse Reparameterization rules: how each module type's tensors widen.

A rule is registered for an exact module type (a subclass may change what the
parameters mean, e.g. weight-standardized convs, so it must be registered itself).
Given the module and whether its input / output channels are expanded (the stem sees
the image, the classifier emits logits), a rule returns a :class:`ModulePlan`: a
:class:`TensorPlan` per tensor, the attributes that change (``out_channels``,
``num_heads``...) and the children it handled itself. Modules without a rule and
without tensors of their own are containers: their children are visited. Anything
else is unsupported and raises ``NotImplementedError`` naming its path and type.
"""
import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Set, Tuple, Type

import torch.nn as nn

from .branches import CBRConv2d
from .expansion import COPY, MIX, ChannelMap, TensorPlan


@dataclass
class RuleContext:
    path: str
    ratio: float
    expand_in: bool = True
    expand_out: bool = True

    def channels(self, n: int, expand: bool = True) -> ChannelMap:
        if not expand:
            return ChannelMap.identity(n)
        cmap = ChannelMap.single(n, self.ratio)
        if not cmap.expanded:
            raise ValueError(
                f'gpd_ratio {self.ratio} adds no channel to {self.path} ({n} channels); use a larger ratio')
        return cmap

    def input_map(self, n: int) -> ChannelMap:
        return self.channels(n, self.expand_in)

    def output_map(self, n: int) -> ChannelMap:
        return self.channels(n, self.expand_out)

    def require_uniform(self, cmap: ChannelMap, what: str):
        if not cmap.uniform:
            raise ValueError(
                f'{self.path} ({what}) normalizes over channels, which stays exact only when every '
                f'channel has the same number of copies: ratio {self.ratio} gives {cmap.size} -> '
                f'{cmap.wide_size} channels. Use an integer gpd_ratio for this model.')


@dataclass
class ModulePlan:
    tensors: Dict[str, TensorPlan] = field(default_factory=dict)  # local dotted name -> plan
    attrs: Dict[str, object] = field(default_factory=dict)  # local dotted 'child.attr' -> value
    handled: Set[str] = field(default_factory=set)  # child names not to visit


Rule = Callable[[nn.Module, RuleContext], ModulePlan]
_RULES: Dict[Type[nn.Module], Rule] = {}
_UNSUPPORTED: Dict[Type[nn.Module], str] = {nn.ChannelShuffle: 'permutes channels'}


def register_rule(*types: Type[nn.Module]):
    def wrap(fn: Rule) -> Rule:
        for t in types:
            _RULES[t] = fn
        return fn
    return wrap


def register_unsupported(module_type: Type[nn.Module], reason: str):
    _UNSUPPORTED[module_type] = reason


def get_rule(module: nn.Module) -> Optional[Rule]:
    return _RULES.get(type(module))


def unsupported_reason(module: nn.Module) -> Optional[str]:
    return _UNSUPPORTED.get(type(module))


def _plan(*dims: Tuple[int, ChannelMap, str]) -> TensorPlan:
    return TensorPlan(tuple(d for d in dims if d[1].expanded))


def _grouped_maps(ctx: RuleContext, in_map: ChannelMap, out_map: ChannelMap, groups: int) -> int:
    """DT group count of a grouped op; each DT group must copy exactly one student group."""
    in_per_group = in_map.size // groups
    out_per_group = out_map.size // groups
    wide_groups = in_map.wide_size // in_per_group
    if (in_map.wide_size % in_per_group or out_map.wide_size % out_per_group
            or out_map.wide_size // out_per_group != wide_groups):
        raise ValueError(
            f'{ctx.path}: grouped conv ({groups} groups of {in_per_group} -> {out_per_group} channels) '
            f'cannot be widened to {in_map.wide_size} -> {out_map.wide_size} channels with whole groups; '
            f'ratio {ctx.ratio} must add a whole number of groups (an integer ratio always does).')
    return wide_groups


def _kernel_plans(ctx: RuleContext, in_channels: int, out_channels: int, groups: int):
    """Plans shared by every [out, in/groups, ...] kernel of a conv, and its new group count."""
    in_map, out_map = ctx.input_map(in_channels), ctx.output_map(out_channels)
    if groups == 1:
        return _plan((0, out_map, COPY), (1, in_map, MIX)), in_map, out_map, 1
    # each output of a grouped conv sees one copy of its inputs: rows are copied unscaled
    wide_groups = _grouped_maps(ctx, in_map, out_map, groups)
    return _plan((0, out_map, COPY)), in_map, out_map, wide_groups


@register_rule(nn.Conv2d, nn.Conv1d)
def conv_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = _kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    plan = ModulePlan(
        tensors={'weight': kernel},
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = _plan((0, out_map, COPY))
    return plan


@register_rule(CBRConv2d)
def cbr_rule(m: CBRConv2d, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = _kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    # the 1x1 mixer maps the input channels onto themselves: a conv with in == out
    mixer, *_ = _kernel_plans(
        RuleContext(ctx.path, ctx.ratio, ctx.expand_in, ctx.expand_in), m.in_channels, m.in_channels, m.groups)
    per_output = _plan((0, out_map, COPY))
    plan = ModulePlan(
        tensors={
            'weight': kernel, 'w_avg': kernel, 'w_prior': kernel, 'w_kxk': kernel, 'w_pw': kernel,
            'mixer': mixer, 'mixer_identity': mixer,
            'w_dw': _plan((0, in_map, COPY)),
            'scales': _plan((1, out_map, COPY)),
        },
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = per_output
    return plan


@register_rule(nn.Linear)
def linear_rule(m: nn.Linear, ctx: RuleContext) -> ModulePlan:
    in_map, out_map = ctx.input_map(m.in_features), ctx.output_map(m.out_features)
    plan = ModulePlan(
        tensors={'weight': _plan((0, out_map, COPY), (1, in_map, MIX))},
        attrs={'in_features': in_map.wide_size, 'out_features': out_map.wide_size})
    if m.bias is not None:
        plan.tensors['bias'] = _plan((0, out_map, COPY))
    return plan


def _per_channel(m: nn.Module, cmap: ChannelMap, names: Sequence[str]) -> Dict[str, TensorPlan]:
    plan = _plan((0, cmap, COPY))
    return {n: plan for n in names if getattr(m, n, None) is not None}


@register_rule(nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm)
def batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, ctx: RuleContext) -> ModulePlan:
    # per-channel statistics of replicas are the replicas' statistics: any ratio is exact
    cmap = ctx.channels(m.num_features)
    return ModulePlan(
        tensors=_per_channel(m, cmap, ('weight', 'bias', 'running_mean', 'running_var')),
        attrs={'num_features': cmap.wide_size})


def layernorm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise NotImplementedError(
            f'{ctx.path} ({type(m).__name__}) normalizes over {shape}; only a channel dimension is supported')
    cmap = ctx.channels(shape[0])
    ctx.require_uniform(cmap, type(m).__name__)
    return ModulePlan(tensors=_per_channel(m, cmap, ('weight', 'bias')), attrs={'normalized_shape': (cmap.wide_size,)})


register_rule(nn.LayerNorm, nn.RMSNorm)(layernorm_rule)


@register_rule(nn.GroupNorm)
def groupnorm_rule(m: nn.GroupNorm, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.channels(m.num_channels)
    ctx.require_uniform(cmap, 'GroupNorm')
    copies = cmap.wide_size // cmap.size
    return ModulePlan(
        tensors=_per_channel(m, cmap, ('weight', 'bias')),
        attrs={'num_channels': cmap.wide_size, 'num_groups': m.num_groups * copies})


def _register_timm_rules():
    """Rules for timm's own layer types (same maths as the torch ones they extend)."""
    from timm import layers
    from timm.layers import norm, norm_act

    register_rule(layers.BatchNormAct2d)(batchnorm_rule)
    if hasattr(norm_act, 'SyncBatchNormAct'):
        register_rule(norm_act.SyncBatchNormAct)(batchnorm_rule)
    for name in ('LayerNorm', 'LayerNorm2d', 'RmsNorm', 'RmsNorm2d', 'SimpleNorm', 'SimpleNorm2d'):
        if hasattr(norm, name):
            register_rule(getattr(norm, name))(layernorm_rule)
    for name in ('LayerNormAct', 'LayerNormAct2d'):
        if hasattr(norm_act, name):
            register_rule(getattr(norm_act, name))(layernorm_rule)
    if hasattr(norm, 'GroupNorm'):
        register_rule(norm.GroupNorm)(groupnorm_rule)
    if hasattr(norm_act, 'GroupNormAct'):
        register_rule(norm_act.GroupNormAct)(groupnorm_rule)
    if hasattr(layers, 'Conv2dSame'):
        register_rule(layers.Conv2dSame)(conv_rule)

    register_rule(layers.Attention)(attention_rule)
    register_rule(layers.LayerScale)(layer_scale_rule)
    from timm.models import vision_transformer as vit
    if vit.Attention is not layers.Attention:
        register_rule(vit.Attention)(attention_rule)
    if vit.LayerScale is not layers.LayerScale:
        register_rule(vit.LayerScale)(layer_scale_rule)
    register_rule(vit.VisionTransformer)(vision_transformer_rule)

    from timm.models import densenet
    register_unsupported(densenet.DenseLayer, 'concatenates the features of earlier layers along channels')
    register_unsupported(densenet.DenseBlock, 'concatenates the features of its layers along channels')


def attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """timm Attention: heads x r, head_dim (so the softmax scale) unchanged.

    With copy-major channels, DT head h is a copy of student head h % H, so its attention
    pattern and output are copies too. The fused qkv rows are three segments (q, k, v),
    each widened on its own.
    """
    if getattr(m, 'gate', None) is not None:
        raise NotImplementedError(f'{ctx.path} (gated {type(m).__name__}) is not supported yet')
    dim = m.qkv.in_features
    attn_dim = m.num_heads * m.head_dim
    qkv_map = ChannelMap.segmented(attn_dim, 3, ctx.ratio)
    wide_attn = qkv_map.wide[0]
    if wide_attn % m.head_dim:
        raise ValueError(
            f'{ctx.path}: ratio {ctx.ratio} widens {attn_dim} attention channels to {wide_attn}, '
            f'not a whole number of heads of {m.head_dim}')
    in_map = ctx.channels(dim)
    plan = ModulePlan(
        tensors={'qkv.weight': _plan((0, qkv_map, COPY), (1, in_map, MIX))},
        attrs={'num_heads': wide_attn // m.head_dim, 'qkv.in_features': in_map.wide_size,
               'qkv.out_features': qkv_map.wide_size},
        handled={'qkv', 'q_norm', 'k_norm'})  # q/k norms act on head_dim, which is unchanged
    if hasattr(m, 'attn_dim'):
        plan.attrs['attn_dim'] = wide_attn
    if m.qkv.bias is not None:
        plan.tensors['qkv.bias'] = _plan((0, qkv_map, COPY))
    return plan


def layer_scale_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.channels(m.gamma.shape[0])
    return ModulePlan(tensors={'gamma': _plan((0, cmap, COPY))})


def vision_transformer_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Token parameters (class/register tokens, position embedding) are channel vectors."""
    cmap = ctx.channels(m.embed_dim)
    plan = ModulePlan()
    for name in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        t = getattr(m, name, None)
        if isinstance(t, nn.Parameter):
            plan.tensors[name] = _plan((t.ndim - 1, cmap, COPY))
    for attr in ('embed_dim', 'num_features', 'head_hidden_size'):
        if hasattr(m, attr) and getattr(m, attr) == m.embed_dim:
            plan.attrs[attr] = cmap.wide_size
    return plan


_register_timm_rules()


def layer_scale_param_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Blocks that keep their layer scale as a direct ``gamma`` parameter (ConvNeXt): a channel
    vector, copied. ``gamma`` is None when the block was built without layer scale."""
    if m.gamma is None:
        return ModulePlan()
    return ModulePlan(tensors={'gamma': _plan((0, ctx.channels(m.gamma.shape[0]), COPY))})


def global_response_norm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ConvNeXt-V2 GRN divides by the mean response over channels, which the replicas keep
    only when every channel has the same number of copies."""
    cmap = ctx.channels(m.weight.shape[0])
    ctx.require_uniform(cmap, 'GlobalResponseNorm')
    return ModulePlan(tensors=_per_channel(m, cmap, ('weight', 'bias')))


def feature_width_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Models whose ``num_features`` (the last feature map's width) differs from the head's input
    width, e.g. MobileNetV3 (a 1x1 head conv follows the pooling): keep it true for the DT."""
    return ModulePlan(attrs={'num_features': ctx.channels(m.num_features).wide_size})


def token_mixing_block_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """MLP-Mixer / ResMLP blocks: the token-mixing MLP works along the tokens, which do not widen,
    the same way for every channel, so it stays as it is. ResMLP's layer scales are channel vectors."""
    plan = ModulePlan(handled={'mlp_tokens', 'linear_tokens'})
    for name in ('ls1', 'ls2'):
        t = getattr(m, name, None)
        if isinstance(t, nn.Parameter):
            plan.tensors[name] = _plan((0, ctx.channels(t.shape[0]), COPY))
    return plan


def affine_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ResMLP's Affine 'norm': per-channel scale and shift of shape [1, 1, C]; any ratio is exact."""
    cmap = ctx.channels(m.alpha.shape[-1])
    return ModulePlan(tensors={'alpha': _plan((2, cmap, COPY)), 'beta': _plan((2, cmap, COPY))})


def _register_timm_family_rules():
    """Families beyond ResNet / MobileNet-V1/V2 / ViT (exact types, as above)."""
    from timm import layers
    from timm.layers import grn
    from timm.models import convnext, deit, mlp_mixer, mobilenetv3

    register_rule(layers.Linear)(linear_rule)  # nn.Linear with a TorchScript dtype cast (MobileNetV3 head)
    register_rule(convnext.ConvNeXtBlock)(layer_scale_param_rule)
    register_rule(grn.GlobalResponseNorm)(global_response_norm_rule)
    register_rule(mobilenetv3.MobileNetV3)(feature_width_rule)
    register_rule(deit.VisionTransformerDistilled)(vision_transformer_rule)  # + dist_token, head_dist
    register_rule(mlp_mixer.MixerBlock, mlp_mixer.ResBlock)(token_mixing_block_rule)
    register_rule(mlp_mixer.Affine)(affine_rule)
    register_rule(mlp_mixer.MlpMixer)(vision_transformer_rule)  # embed_dim and the widths equal to it


_register_timm_family_rules()


# Common timm blocks whose forward splits, concatenates or reshapes channels by count. Refused
# up front with the reason: otherwise the DT's forward fails with a shape error of its own, or
# the exactness check names them only after the whole DT was built.
_UNSUPPORTED_TIMM_BLOCKS = (
    ('timm.models.cspnet', 'CrossStage', 'splits its channels in two parts and concatenates them'),
    ('timm.models.cspnet', 'CrossStage3', 'splits its channels in two parts and concatenates them'),
    ('timm.models.ghostnet', 'GhostModule', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.ghostnet', 'GhostModuleV2', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.ghostnet', 'GhostModuleV3', 'concatenates primary and cheap features, then keeps the first channels'),
    ('timm.models.dpn', 'DualPathBlock', 'splits and concatenates its residual and dense paths'),
    ('timm.models.rexnet', 'LinearBottleneck', 'adds its shortcut to the first channels only'),
    ('timm.layers.selective_kernel', 'SelectiveKernel', 'splits and reshapes its channels into kernel paths'),
    ('timm.layers.split_attn', 'SplitAttn', 'reshapes its channels into radix splits and weighs them by a softmax across the splits'),
    ('timm.models.res2net', 'Bottle2neck', 'splits its channels into scales'),
    ('timm.models.dla', 'DlaBottle2neck', 'splits its channels into scales'),
    ('timm.models.dla', 'DlaRoot', 'concatenates the outputs of its children'),
    ('timm.layers.mixed_conv2d', 'MixedConv2d', 'splits its channels into fixed-size groups, one kernel size each'),
    ('timm.models.vovnet', 'OsaBlock', 'concatenates the outputs of its layers'),
    ('timm.models.inception_v3', 'InceptionA', 'concatenates its branches'),
    ('timm.models.inception_v3', 'InceptionB', 'concatenates its branches'),
    ('timm.models.inception_v3', 'InceptionC', 'concatenates its branches'),
    ('timm.models.inception_v3', 'InceptionD', 'concatenates its branches'),
    ('timm.models.inception_v3', 'InceptionE', 'concatenates its branches'),
    ('timm.models.selecsls', 'SelecSlsBlock', 'concatenates the outputs of its layers'),
    ('timm.models.hgnet', 'HighPerfGpuBlock', 'concatenates the outputs of its layers'),
    ('timm.models.mobilevit', 'MobileVitBlock', 'concatenates its input with the output of its transformer'),
    ('timm.models.mlp_mixer', 'SpatialGatingUnit', 'splits its channels in two halves (gMLP)'),
    ('timm.models.efficientvit_mit', 'LiteMLA', 'concatenates its multi-scale q/k/v and reshapes them into heads'),
)


def _register_timm_unsupported():
    for module_name, name, reason in _UNSUPPORTED_TIMM_BLOCKS:
        module_type = getattr(importlib.import_module(module_name), name, None)
        if module_type is not None:
            register_unsupported(module_type, reason)


_register_timm_unsupported()
