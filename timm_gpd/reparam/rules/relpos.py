"""Relative position biases computed per head (timm.layers.pos_embed_rel) and the window
attention that uses them (GCViT, MaxViT / CoAtNet, Swin V2 CR, ViT-RelPos, Hiera)."""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types
from .layers import head_maps, multi_head_attention_rule


def _heads(ctx: RuleContext, num_heads: int):
    return ctx.heads(num_heads)


@register_rule(*timm_types('timm.layers.pos_embed_rel', 'RelPosBias'))
def rel_pos_bias_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """A [positions, heads] table: copied along the heads."""
    heads = _heads(ctx, m.relative_position_bias_table.shape[-1])
    return ModulePlan(tensors={'relative_position_bias_table': plan_of((1, heads, COPY))},
                      attrs={'bias_shape': tuple(m.bias_shape[:-1]) + (heads.wide_size,)})


@register_rule(*timm_types('timm.layers.pos_embed_rel', 'RelPosMlp'))
def rel_pos_mlp_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """An MLP from relative coordinates to one bias per head: its last layer's rows are copied."""
    heads = _heads(ctx, m.num_heads)
    plan = ModulePlan(attrs={'num_heads': heads.wide_size, 'bias_shape': tuple(m.bias_shape[:-1]) + (heads.wide_size,),
                             'mlp.fc2.out_features': heads.wide_size}, handled={'mlp'})
    plan.tensors['mlp.fc2.weight'] = plan_of((0, heads, COPY))
    if m.mlp.fc2.bias is not None:
        plan.tensors['mlp.fc2.bias'] = plan_of((0, heads, COPY))
    return plan


@register_rule(*timm_types('timm.models.swin_transformer_v2_cr', 'WindowMultiHeadAttention'))
def window_attention_v2_cr_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Swin V2 CR: cosine attention, per-head logit scale, a meta MLP emitting one bias per head."""
    plan = multi_head_attention_rule(m, ctx)
    _, head_map = head_maps(ctx, m.num_heads, m.in_features // m.num_heads)
    fc2 = m.meta_mlp.fc2
    plan.tensors['meta_mlp.fc2.weight'] = plan_of((0, head_map, COPY))
    if fc2.bias is not None:
        plan.tensors['meta_mlp.fc2.bias'] = plan_of((0, head_map, COPY))
    plan.attrs.update({'meta_mlp.fc2.out_features': head_map.wide_size, 'in_features': ctx.channels(m.in_features).wide_size})
    plan.handled.add('meta_mlp')
    return plan


@register_rule(*timm_types('timm.models.hiera', 'MaskUnitAttention'))
def mask_unit_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Hiera: the head count is ``heads``; ``dim_out`` is the attention width."""
    m.num_heads = m.heads  # read by the generic rule only; timm's forward reads ``heads``
    try:
        plan = multi_head_attention_rule(m, ctx)
    finally:
        del m.num_heads
    plan.attrs['heads'] = plan.attrs.pop('num_heads')
    plan.attrs['dim_out'] = ctx.channels(m.dim_out).wide_size
    plan.attrs['dim'] = ctx.channels(m.dim).wide_size
    return plan


register_rule(
    *timm_types('timm.models.swin_transformer_v2_cr', 'SwinTransformerV2CrBlock'))(lambda m, ctx: ModulePlan())


register_rule(*timm_types('timm.models.gcvit', 'WindowAttentionGlobal'))(multi_head_attention_rule)


@register_rule(*timm_types('timm.models.maxxvit', 'AttentionCl', 'Attention2d'))
def maxxvit_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """MaxViT / CoAtNet: with ``head_first`` the qkv rows are laid out head by head (heads x
    (q, k, v)), one copy-major space the Linear / conv rule widens whole; else three segments."""
    if not m.head_first:
        return multi_head_attention_rule(m, ctx)
    heads = _heads(ctx, m.num_heads)
    return ModulePlan(attrs={'num_heads': heads.wide_size})


@register_rule(*timm_types('timm.layers.pos_embed_rel', 'RelPosBiasTf'))
def rel_pos_bias_tf_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """The TensorFlow-style table is [heads, height, width]: copied along its first dim."""
    heads = _heads(ctx, m.num_heads)
    return ModulePlan(tensors={'relative_position_bias_table': plan_of((0, heads, COPY))},
                      attrs={'num_heads': heads.wide_size, 'bias_shape': (heads.wide_size,) + tuple(m.bias_shape[1:])})


@register_rule(*timm_types('timm.models.hieradet_sam2', 'MultiScaleAttention'))
def sam2_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    plan = multi_head_attention_rule(m, ctx)
    plan.attrs.update({'dim': ctx.channels(m.dim).wide_size, 'dim_out': ctx.channels(m.dim_out).wide_size})
    return plan


@register_rule(*timm_types('timm.models.mvitv2', 'MultiScaleAttention'))
def multiscale_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """MViT-V2: q/k/v are pooled per head by convs over head_dim (mode 'conv') and get relative
    position terms over head_dim: none of that widens; heads do."""
    if m.unshared:
        raise NotImplementedError(f'{ctx.path} ({type(m).__name__}): unshared pooling convs run over all heads')
    plan = multi_head_attention_rule(m, ctx)
    plan.handled.update({'pool_q', 'pool_k', 'pool_v', 'norm_q', 'norm_k', 'norm_v'})
    plan.attrs['dim_out'] = ctx.channels(m.dim_out).wide_size
    return plan
