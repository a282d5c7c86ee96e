"""HGNet: a block concatenates the outputs of its layers (channel segments); the learnable
affine is one scale and one bias for all channels."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types


@register_rule(*timm_types('timm.models.hgnet', 'LearnableAffineBlock'))
@follows_segments
def learnable_affine_rule(m, ctx: RuleContext) -> ModulePlan:
    """``scale * x + bias`` with scalar parameters: the same for every copy, nothing widens."""
    return ModulePlan()
