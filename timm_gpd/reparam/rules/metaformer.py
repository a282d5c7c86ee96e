"""Conv / MetaFormer-style families whose blocks keep a layer-scale vector of their own
(InceptionNeXt, FastViT, EdgeNeXt...): copied along channels."""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types
from .layers import channel_vectors, groupnorm_rule, layernorm_rule

register_rule(*timm_types('timm.models.inception_next', 'MetaNeXtBlock'))(channel_vectors('gamma', dim=0))
register_rule(*timm_types('timm.models.fastvit', 'LayerScale2d'), *timm_types('timm.models.swiftformer', 'LayerScale2d'))(
    channel_vectors('gamma', dim=0))
register_rule(*timm_types('timm.models.edgenext', 'ConvBlock'))(channel_vectors('gamma', dim=0))
# StarReLU's scale and bias are scalars shared by every channel: nothing widens
register_rule(*timm_types('timm.models.metaformer', 'StarReLU'))(lambda m, ctx: ModulePlan())
register_rule(*timm_types('timm.models.metaformer', 'GroupNorm1NoBias'))(groupnorm_rule)
register_rule(*timm_types('timm.models.metaformer', 'LayerNorm2dNoBias', 'LayerNormNoBias'))(layernorm_rule)


@register_rule(*timm_types('timm.models.metaformer', 'Scale'))
def scale_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """MetaFormer's Scale: a channel vector viewed as ``shape`` ((C, 1, 1) or (C,))."""
    cmap = ctx.channels(m.scale.shape[0])
    return ModulePlan(tensors={'scale': plan_of((0, cmap, COPY))},
                      attrs={'shape': (cmap.wide_size,) + tuple(m.shape[1:])})
