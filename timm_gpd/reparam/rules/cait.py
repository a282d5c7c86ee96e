"""CaiT: talking-heads self-attention, class attention, per-block layer scales, model tokens.

Talking heads mix the attention maps across heads with Linear(heads, heads) layers: with the
heads copied (copy-major) these are Linears over an expanded dimension, widened by the Linear rule.
Class attention reads q/k/v from separate Linears and takes head_dim as ``C // num_heads``:
only ``num_heads`` has to follow.
"""
import torch.nn as nn

from ._registry import ModulePlan, RuleContext, register_rule, timm_types
from .layers import channel_vectors, head_maps, multi_head_attention_rule

register_rule(*timm_types('timm.models.cait', 'TalkingHeadAttn'))(multi_head_attention_rule)
register_rule(*timm_types('timm.models.cait', 'LayerScaleBlock', 'LayerScaleBlockClassAttn'))(
    channel_vectors('gamma_1', 'gamma_2'))
register_rule(*timm_types('timm.models.cait', 'Cait'))(channel_vectors('cls_token', 'pos_embed'))


@register_rule(*timm_types('timm.models.cait', 'ClassAttn'))
def class_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    _, head_map = head_maps(ctx, m.num_heads, m.q.out_features // m.num_heads)
    return ModulePlan(attrs={'num_heads': head_map.wide_size})
