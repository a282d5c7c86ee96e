"""LeViT (and EfficientFormer, TinyViT): attention whose fused qkv rows are laid out head by head, with per-head attention biases.

``qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim])``: the rows are heads x
(q, k, v) blocks, so the copy-major widening of the whole row dimension copies whole heads, and
the Linear / BatchNorm rules widen it as one space. Heads widen x r; ``attention_biases``
[heads, positions] is copied along the heads. The eval-mode bias cache of the copied student
is dropped (it holds the student's biases).
"""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types


@register_rule(
    *timm_types('timm.models.levit', 'Attention', 'AttentionDownsample'),
    *timm_types('timm.models.efficientformer', 'Attention'),
    *timm_types('timm.models.tiny_vit', 'Attention'),
    *timm_types('timm.models.efficientformer_v2', 'Attention2d', 'Attention2dDownsample'))
def head_major_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """LeViT, EfficientFormer (V1, V2) and TinyViT attention: head-major q/k/v rows, per-head biases
    (V2's talking-head 1x1 convs run across the heads: the conv rule widens them like any channels)."""
    heads = ctx.heads(m.num_heads)
    copies = heads.wide_size // m.num_heads
    attrs = {'num_heads': heads.wide_size, 'attention_bias_cache': {}}
    for name in ('key_attn_dim', 'val_attn_dim', 'out_dim', 'dh'):  # widths of all heads together
        if isinstance(getattr(m, name, None), int):
            attrs[name] = getattr(m, name) * copies
    return ModulePlan(tensors={'attention_biases': plan_of((0, heads, COPY))}, attrs=attrs)


@register_rule(*timm_types('timm.models.lowformer', 'ConvAttention'), *timm_types('timm.models.cpubone', 'ConvAttention'))
def conv_attention_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """LowFormer / CPUBone conv attention: the projected channels are laid out head by head
    (heads x (q, k, v) x head_dim), one copy-major space; heads widen, head_dim stays."""
    heads = ctx.heads(m.num_heads)
    copies = heads.wide_size // m.num_heads
    return ModulePlan(attrs={'num_heads': heads.wide_size, 'o_proj_inpdim': m.o_proj_inpdim * copies})
