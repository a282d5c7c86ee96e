"""Rules of torch's and timm's building blocks: convs, linears, norms, attention, layer scale."""
import torch.nn as nn

from ..branches import CBRConv2d
from ..expansion import COPY, MIX, ChannelMap
from ._registry import ModulePlan, RuleContext, per_channel, plan_of, register_rule, timm_types


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


def kernel_plans(ctx: RuleContext, in_channels: int, out_channels: int, groups: int):
    """Plans shared by every [out, in/groups, ...] kernel of a conv, and its new group count."""
    in_map, out_map = ctx.input_map(in_channels), ctx.output_map(out_channels)
    if groups == 1:
        return plan_of((0, out_map, COPY), (1, in_map, MIX)), in_map, out_map, 1
    # each output of a grouped conv sees one copy of its inputs: rows are copied unscaled
    wide_groups = _grouped_maps(ctx, in_map, out_map, groups)
    return plan_of((0, out_map, COPY)), in_map, out_map, wide_groups


@register_rule(nn.Conv2d, nn.Conv1d, *timm_types('timm.layers', 'Conv2dSame'))
def conv_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    plan = ModulePlan(
        tensors={'weight': kernel},
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


@register_rule(CBRConv2d)
def cbr_rule(m: CBRConv2d, ctx: RuleContext) -> ModulePlan:
    kernel, in_map, out_map, groups = kernel_plans(ctx, m.in_channels, m.out_channels, m.groups)
    # the 1x1 mixer maps the input channels onto themselves: a conv with in == out
    mixer, *_ = kernel_plans(
        RuleContext(ctx.path, ctx.ratio, ctx.expand_in, ctx.expand_in), m.in_channels, m.in_channels, m.groups)
    plan = ModulePlan(
        tensors={
            'weight': kernel, 'w_avg': kernel, 'w_prior': kernel, 'w_kxk': kernel, 'w_pw': kernel,
            'mixer': mixer, 'mixer_identity': mixer,
            'w_dw': plan_of((0, in_map, COPY)),
            'scales': plan_of((1, out_map, COPY)),
        },
        attrs={'in_channels': in_map.wide_size, 'out_channels': out_map.wide_size, 'groups': groups})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


# timm's Linear is nn.Linear with a TorchScript dtype cast (MobileNetV3 head)
@register_rule(nn.Linear, *timm_types('timm.layers', 'Linear'))
def linear_rule(m: nn.Linear, ctx: RuleContext) -> ModulePlan:
    in_map, out_map = ctx.input_map(m.in_features), ctx.output_map(m.out_features)
    plan = ModulePlan(
        tensors={'weight': plan_of((0, out_map, COPY), (1, in_map, MIX))},
        attrs={'in_features': in_map.wide_size, 'out_features': out_map.wide_size})
    if m.bias is not None:
        plan.tensors['bias'] = plan_of((0, out_map, COPY))
    return plan


@register_rule(
    nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm,
    *timm_types('timm.layers.norm_act', 'BatchNormAct2d', 'SyncBatchNormAct'))
def batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, ctx: RuleContext) -> ModulePlan:
    # per-channel statistics of replicas are the replicas' statistics: any ratio is exact
    cmap = ctx.channels(m.num_features)
    return ModulePlan(
        tensors=per_channel(m, cmap, ('weight', 'bias', 'running_mean', 'running_var')),
        attrs={'num_features': cmap.wide_size})


@register_rule(
    nn.LayerNorm, nn.RMSNorm,
    *timm_types('timm.layers.norm', 'LayerNorm', 'LayerNorm2d', 'RmsNorm', 'RmsNorm2d', 'SimpleNorm', 'SimpleNorm2d'),
    *timm_types('timm.layers.norm_act', 'LayerNormAct', 'LayerNormAct2d'))
def layernorm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    shape = tuple(m.normalized_shape)
    if len(shape) != 1:
        raise NotImplementedError(
            f'{ctx.path} ({type(m).__name__}) normalizes over {shape}; only a channel dimension is supported')
    cmap = ctx.channels(shape[0])
    ctx.require_uniform(cmap, type(m).__name__)
    return ModulePlan(tensors=per_channel(m, cmap, ('weight', 'bias')), attrs={'normalized_shape': (cmap.wide_size,)})


@register_rule(nn.GroupNorm, *timm_types('timm.layers.norm', 'GroupNorm'), *timm_types('timm.layers.norm_act', 'GroupNormAct'))
def groupnorm_rule(m: nn.GroupNorm, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.channels(m.num_channels)
    ctx.require_uniform(cmap, 'GroupNorm')
    copies = cmap.wide_size // cmap.size
    return ModulePlan(
        tensors=per_channel(m, cmap, ('weight', 'bias')),
        attrs={'num_channels': cmap.wide_size, 'num_groups': m.num_groups * copies})


@register_rule(*timm_types('timm.layers.grn', 'GlobalResponseNorm'))
def global_response_norm_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ConvNeXt-V2 GRN divides by the mean response over channels, which the replicas keep
    only when every channel has the same number of copies."""
    cmap = ctx.channels(m.weight.shape[0])
    ctx.require_uniform(cmap, 'GlobalResponseNorm')
    return ModulePlan(tensors=per_channel(m, cmap, ('weight', 'bias')))


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
        tensors={'qkv.weight': plan_of((0, qkv_map, COPY), (1, in_map, MIX))},
        attrs={'num_heads': wide_attn // m.head_dim, 'qkv.in_features': in_map.wide_size,
               'qkv.out_features': qkv_map.wide_size},
        handled={'qkv', 'q_norm', 'k_norm'})  # q/k norms act on head_dim, which is unchanged
    if hasattr(m, 'attn_dim'):
        plan.attrs['attn_dim'] = wide_attn
    if m.qkv.bias is not None:
        plan.tensors['qkv.bias'] = plan_of((0, qkv_map, COPY))
    return plan


register_rule(*timm_types('timm.layers', 'Attention'), *timm_types('timm.models.vision_transformer', 'Attention'))(
    attention_rule)


@register_rule(*timm_types('timm.layers', 'LayerScale'), *timm_types('timm.models.vision_transformer', 'LayerScale'))
def layer_scale_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    cmap = ctx.channels(m.gamma.shape[0])
    return ModulePlan(tensors={'gamma': plan_of((0, cmap, COPY))})
