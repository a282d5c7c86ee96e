"""RDNet: dense stages concatenate the features of their blocks (channel segments); each block
scales its new features by a layer-scale vector."""
from ._registry import register_rule, timm_types
from .layers import channel_vectors

register_rule(*timm_types('timm.models.rdnet', 'DenseBlock'))(channel_vectors('gamma', dim=0))
