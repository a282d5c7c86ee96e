"""LeViT: attention whose fused qkv rows are laid out head by head, with per-head attention biases.

``qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim])``: the rows are heads x
(q, k, v) blocks, so the copy-major widening of the whole row dimension copies whole heads, and
the Linear / BatchNorm rules widen it as one space. Heads widen x r; ``attention_biases``
[heads, positions] is copied along the heads. The eval-mode bias cache of the copied student
is dropped (it holds the student's biases).
"""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types


@register_rule(*timm_types('timm.models.levit', 'Attention', 'AttentionDownsample'))
def levit_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    heads = ctx.channels(m.num_heads)
    copies = heads.wide_size // m.num_heads
    if heads.wide_size % m.num_heads:
        raise ValueError(f'{ctx.path}: LeViT attention needs an integer gpd_ratio (heads are copied whole)')
    return ModulePlan(
        tensors={'attention_biases': plan_of((0, heads, COPY))},
        attrs={'num_heads': heads.wide_size, 'key_attn_dim': m.key_attn_dim * copies,
               'val_attn_dim': m.val_attn_dim * copies, 'attention_bias_cache': {}})
