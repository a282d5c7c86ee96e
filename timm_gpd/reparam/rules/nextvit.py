"""NextViT: its transformer block concatenates the attention path with a conv-attention path
(channel segments); the efficient attention has separate q / k / v Linears."""
from ._registry import register_rule, timm_types
from .layers import multi_head_attention_rule

register_rule(*timm_types('timm.models.nextvit', 'EfficientAttention'))(multi_head_attention_rule)
