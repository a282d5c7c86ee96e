"""Vision Transformer family (vision_transformer, deit): token parameters."""
import torch.nn as nn

from ._registry import ModulePlan, RuleContext, channel_vector, register_rule, timm_types


def token_params_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Token parameters (class/register/distillation tokens, position embedding) are channel
    vectors; ``embed_dim`` and the widths equal to it follow."""
    cmap = ctx.channels(m.embed_dim)
    plan = ModulePlan()
    for name in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        t = getattr(m, name, None)
        if isinstance(t, nn.Parameter):
            plan.tensors[name] = channel_vector(t, cmap)
    for attr in ('embed_dim', 'num_features', 'head_hidden_size'):
        if hasattr(m, attr) and getattr(m, attr) == m.embed_dim:
            plan.attrs[attr] = cmap.wide_size
    return plan


# DeiT's distilled model adds dist_token and head_dist
register_rule(
    *timm_types('timm.models.vision_transformer', 'VisionTransformer'),
    *timm_types('timm.models.deit', 'VisionTransformerDistilled'))(token_params_rule)
