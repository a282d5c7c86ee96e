"""Inverse Reparameterization rules: how each module type's tensors widen.

``_registry`` holds the registry and what rules receive and return; ``layers`` the rules of
torch's and timm's building blocks (convs, linears, norms, attention, layer scale); one module
per timm model family adds that family's own blocks, as timm splits its models; ``unsupported``
names the blocks refused up front with their reason.
"""
from ._registry import (
    ModulePlan, Rule, RuleContext, channel_vector, get_rule, per_channel, plan_of, register_rule,
    register_unsupported, timm_types, unsupported_reason, follows_segments, reads_segments,
)
from . import layers  # noqa: F401  (registers)
from . import beit, cait, convnext, eva, levit, metaformer, mlp_mixer, mobilenetv3, swin, token_models, vit  # noqa: F401,E501  (register)
from . import (  # noqa: F401  (register: blocks that split or concatenate channels by count)
    cspnet, dpn, efficientvit_mit, fasternet, focalnet, ghostnet, hgnet, inception_next, mambaout, mixed_conv,
    nextvit, rdnet, res2net, rexnet, shvit, sknet)
from . import attention_zoo, relpos  # noqa: F401  (register)
from . import unsupported  # noqa: F401  (registers)
