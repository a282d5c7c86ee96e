"""ConvNeXt (V1 and V2): the block's own layer-scale vector."""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, plan_of, register_rule, timm_types


@register_rule(*timm_types('timm.models.convnext', 'ConvNeXtBlock'))
def layer_scale_param_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Blocks that keep their layer scale as a direct ``gamma`` parameter: a channel vector,
    copied. ``gamma`` is None when the block was built without layer scale."""
    if m.gamma is None:
        return ModulePlan()
    return ModulePlan(tensors={'gamma': plan_of((0, ctx.channels(m.gamma.shape[0]), COPY))})
