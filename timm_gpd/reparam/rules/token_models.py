"""Model-level class tokens and position embeddings of ViT-like families (CoaT, ConViT, CrossViT,
PiT, Hiera, TNT...): channel vectors along their last dim, copied."""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types
from .layers import channel_vectors, head_maps, multi_head_attention_rule

register_rule(*timm_types('timm.models.coat', 'CoaT'))(
    channel_vectors('cls_token1', 'cls_token2', 'cls_token3', 'cls_token4'))
register_rule(*timm_types('timm.models.convit', 'ConVit'))(channel_vectors('cls_token', 'pos_embed'))
register_rule(*timm_types('timm.models.crossvit', 'CrossVit'))(channel_vectors(
    *(f'{kind}_{i}' for kind in ('pos_embed', 'cls_token') for i in range(4))))
register_rule(*timm_types('timm.models.hiera', 'Hiera'))(channel_vectors('pos_embed', 'pos_embed_temporal'))
register_rule(*timm_types('timm.models.hieradet_sam2', 'HieraDet'))(channel_vectors(('pos_embed', 1), ('pos_embed_window', 1)))
register_rule(*timm_types('timm.models.convit', 'MHSA'))(multi_head_attention_rule)
register_rule(*timm_types('timm.models.nest', 'NestLevel'))(channel_vectors('pos_embed'))


@register_rule(*timm_types('timm.models.pit', 'PoolingVisionTransformer'))
def pit_tokens_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """PiT keeps its position embedding as a feature map [1, C, H, W] and its tokens as [1, n, C]."""
    plan = channel_vectors('cls_token')(m, ctx)
    plan.tensors['pos_embed'] = plan_of((1, ctx.channels(m.pos_embed.shape[1]), COPY))
    return plan


@register_rule(*timm_types('timm.models.convit', 'GPSA'))
def gated_positional_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ConViT GPSA: a fused q/k Linear (two segments), a per-head gate, and ``pos_proj`` mapping
    3-D relative positions to one score per head (its input does not widen)."""
    from ..expansion import MIX, ChannelMap
    head_dim = m.qk.out_features // 2 // m.num_heads
    attn_map, head_map = head_maps(ctx, m.num_heads, head_dim)
    qk_map = ChannelMap((attn_map.size,) * 2, (attn_map.wide_size,) * 2)
    in_map = ctx.channels(m.qk.in_features)
    plan = ModulePlan(
        tensors={'qk.weight': plan_of((0, qk_map, COPY), (1, in_map, MIX)),
                 'gating_param': plan_of((0, head_map, COPY)),
                 'pos_proj.weight': plan_of((0, head_map, COPY)),
                 'pos_proj.bias': plan_of((0, head_map, COPY))},
        attrs={'num_heads': head_map.wide_size, 'dim': in_map.wide_size, 'qk.in_features': in_map.wide_size,
               'qk.out_features': qk_map.wide_size, 'pos_proj.out_features': head_map.wide_size},
        handled={'qk', 'pos_proj'})
    if m.qk.bias is not None:
        plan.tensors['qk.bias'] = plan_of((0, qk_map, COPY))
    return plan
register_rule(*timm_types('timm.models.pvt_v2', 'Attention'))(multi_head_attention_rule)  # q + fused kv
