"""GhostNet: a ghost module concatenates its primary features with a cheap (depthwise) transform
of them and keeps the first ``out_chs`` channels."""
from ._registry import ModulePlan, RuleContext, follows_segments, register_rule, timm_types
from .mobilenetv3 import feature_width_rule


@register_rule(*timm_types('timm.models.ghostnet', 'GhostModule', 'GhostModuleV2', 'GhostModuleV3'))
@follows_segments
def ghost_module_rule(m, ctx: RuleContext) -> ModulePlan:
    """The kept channels are the module's output segments (primary, then cheap features, cut at
    ``out_chs`` by the channel tracing): the DT keeps their width. The children (convs, norms,
    V2's gating branch, V3's re-parameterizable branches) widen by their own rules."""
    return ModulePlan(attrs={'out_chs': ctx.output_map(m.out_chs).wide_size})


# its num_features (the last feature map's width) is not the classifier's input: a 1x1 head conv
# follows the pooling, as in MobileNetV3
register_rule(*timm_types('timm.models.ghostnet', 'GhostNet'))(feature_width_rule)
