"""Swin Transformer V1 / V2 (and V2 CR's patch merging): window attention with per-head relative position bias, patch merging."""
import torch.nn as nn

from ..expansion import COPY, MIX, ChannelMap
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types
from .layers import head_maps

_SWIN = ('timm.models.swin_transformer', 'timm.models.swin_transformer_v2')


def _qkv_plan(ctx: RuleContext, m: nn.Module, num_heads: int, head_dim: int, plan: ModulePlan) -> ChannelMap:
    """The fused qkv Linear: rows are three segments (q, k, v) of heads x head_dim."""
    attn_map, head_map = head_maps(ctx, num_heads, head_dim)
    qkv_map = ChannelMap((attn_map.size,) * 3, (attn_map.wide_size,) * 3)
    in_map = ctx.channels(m.qkv.in_features)
    plan.tensors['qkv.weight'] = plan_of((0, qkv_map, COPY), (1, in_map, MIX))
    if m.qkv.bias is not None:
        plan.tensors['qkv.bias'] = plan_of((0, qkv_map, COPY))
    plan.attrs.update({'num_heads': head_map.wide_size, 'qkv.in_features': in_map.wide_size,
                       'qkv.out_features': qkv_map.wide_size})
    plan.handled.add('qkv')
    return head_map


@register_rule(*timm_types('timm.models.swin_transformer', 'WindowAttention'))
def window_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Swin V1: the relative position bias table is [positions, heads]: copied along the heads."""
    plan = ModulePlan()
    head_dim = m.qkv.out_features // 3 // m.num_heads
    head_map = _qkv_plan(ctx, m, m.num_heads, head_dim, plan)
    plan.tensors['relative_position_bias_table'] = plan_of((1, head_map, COPY))
    return plan


@register_rule(*timm_types('timm.models.swin_transformer_v2', 'WindowAttention'))
def window_attention_v2_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Swin V2: cosine attention with a per-head logit scale, q/k/v biases as separate vectors,
    and a continuous position bias MLP whose last layer emits one value per head."""
    plan = ModulePlan()
    head_dim = m.qkv.out_features // 3 // m.num_heads
    attn_map, _ = head_maps(ctx, m.num_heads, head_dim)
    head_map = _qkv_plan(ctx, m, m.num_heads, head_dim, plan)
    plan.tensors['logit_scale'] = plan_of((0, head_map, COPY))
    for name in ('q_bias', 'k_bias', 'v_bias'):
        if getattr(m, name, None) is not None:
            plan.tensors[name] = plan_of((0, attn_map, COPY))
    last = m.cpb_mlp[-1]
    plan.tensors['cpb_mlp.2.weight'] = plan_of((0, head_map, COPY))  # its input (2-D coordinates) does not widen
    if last.bias is not None:
        plan.tensors['cpb_mlp.2.bias'] = plan_of((0, head_map, COPY))
    plan.attrs['cpb_mlp.2.out_features'] = head_map.wide_size
    plan.attrs['dim'] = ctx.channels(m.dim).wide_size
    plan.handled.add('cpb_mlp')
    return plan


@register_rule(*timm_types('timm.models.swin_transformer', 'PatchMerging'),
               *timm_types('timm.models.swin_transformer_v2', 'PatchMerging'),
               *timm_types('timm.models.swin_transformer_v2_cr', 'PatchMerging'))
def patch_merging_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """The 2x2 neighbours are concatenated along channels: 4 segments of C, each widened on its
    own. V1 normalizes the 4C concatenation (every channel has the same copies: exact), V2 the output."""
    dim, out_dim = m.reduction.in_features // 4, m.reduction.out_features
    merged = ChannelMap((dim,) * 4, (ctx.channels(dim).wide_size,) * 4)
    out_map = ctx.channels(out_dim)
    plan = ModulePlan(
        tensors={'reduction.weight': plan_of((0, out_map, COPY), (1, merged, MIX))},
        attrs={'reduction.in_features': merged.wide_size, 'reduction.out_features': out_map.wide_size},
        handled={'reduction', 'norm'})
    for attr, width in (('dim', dim), ('out_dim', out_dim)):
        if getattr(m, attr, None) == width:
            plan.attrs[attr] = ctx.channels(width).wide_size
    norm_map = merged if tuple(m.norm.normalized_shape) == (4 * dim,) else out_map
    ctx.require_uniform(norm_map, 'PatchMerging norm')
    for name in ('weight', 'bias'):
        if getattr(m.norm, name, None) is not None:
            plan.tensors[f'norm.{name}'] = plan_of((0, norm_map, COPY))
    plan.attrs['norm.normalized_shape'] = (norm_map.wide_size,)
    return plan


# blocks keep their shifted-window attention mask as a buffer: tokens x tokens, no channels
register_rule(*timm_types('timm.models.swin_transformer', 'SwinTransformerBlock'),
              *timm_types('timm.models.swin_transformer_v2', 'SwinTransformerV2Block'))(lambda m, ctx: ModulePlan())
