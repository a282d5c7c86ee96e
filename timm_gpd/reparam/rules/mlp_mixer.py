"""MLP-Mixer / ResMLP: token-mixing MLPs, Affine norms, layer scales."""
import torch.nn as nn

from ..expansion import COPY
from ._registry import ModulePlan, RuleContext, follows_segments, plan_of, register_rule, timm_types
from .vit import token_params_rule


@register_rule(*timm_types('timm.models.mlp_mixer', 'MixerBlock', 'ResBlock'))
def token_mixing_block_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """The token-mixing MLP works along the tokens, which do not widen, the same way for every
    channel, so it stays as it is. ResMLP's layer scales are channel vectors."""
    plan = ModulePlan(handled={'mlp_tokens', 'linear_tokens'})
    for name in ('ls1', 'ls2'):
        t = getattr(m, name, None)
        if isinstance(t, nn.Parameter):
            plan.tensors[name] = plan_of((0, ctx.channels(t.shape[0]), COPY))
    return plan


@register_rule(*timm_types('timm.models.mlp_mixer', 'Affine'))
def affine_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """ResMLP's Affine 'norm': per-channel scale and shift of shape [1, 1, C]; any ratio is exact."""
    cmap = ctx.channels(m.alpha.shape[-1])
    return ModulePlan(tensors={'alpha': plan_of((2, cmap, COPY)), 'beta': plan_of((2, cmap, COPY))})


register_rule(*timm_types('timm.models.mlp_mixer', 'MlpMixer'))(token_params_rule)  # embed_dim and widths equal to it


@register_rule(*timm_types('timm.models.mlp_mixer', 'SpatialGatingUnit'))
@follows_segments
def spatial_gating_rule(m: nn.Module, ctx: RuleContext) -> ModulePlan:
    """gMLP: ``u, v = x.chunk(2, dim=-1)`` (the channel tracing cuts the block's ``fc1`` rows in
    two segments, so each half's copies stay together); ``proj`` mixes the tokens, which do not
    widen, the same way for every channel: it stays as it is. ``norm`` is over one half."""
    return ModulePlan(handled={'proj'})
