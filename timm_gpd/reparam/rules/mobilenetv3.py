"""MobileNetV3 (CPUBone, LowFormer, FasterNet, MambaOut, EfficientViT-MIT): the model's ``num_features`` is not the classifier's input width."""
import torch.nn as nn

from ._registry import ModulePlan, RuleContext, register_rule, timm_types


@register_rule(*timm_types('timm.models.mobilenetv3', 'MobileNetV3'), *timm_types('timm.models.cpubone', 'CPUBone'),
               *timm_types('timm.models.lowformer', 'LowFormer'), *timm_types('timm.models.fasternet', 'FasterNet'),
               *timm_types('timm.models.mambaout', 'MambaOut'),
               *timm_types('timm.models.efficientvit_mit', 'EfficientVit'))
def feature_width_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """Models whose ``num_features`` (the last feature map's width) differs from the head's input
    width (a 1x1 head conv follows the pooling): keep it true for the DT."""
    return ModulePlan(attrs={'num_features': ctx.channels(m.num_features).wide_size})
