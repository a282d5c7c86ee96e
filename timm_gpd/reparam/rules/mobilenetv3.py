"""MobileNetV3 (CPUBone, LowFormer): the model's ``num_features`` is not the classifier's input width."""
import torch.nn as nn

from ._registry import ModulePlan, RuleContext, register_rule, timm_types


@register_rule(*timm_types('timm.models.mobilenetv3', 'MobileNetV3'), *timm_types('timm.models.cpubone', 'CPUBone'),
               *timm_types('timm.models.lowformer', 'LowFormer'))
def feature_width_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Models whose ``num_features`` (the last feature map's width) differs from the head's input
    width (a 1x1 head conv follows the pooling): keep it true for the DT."""
    return ModulePlan(attrs={'num_features': ctx.channels(m.num_features).wide_size})
