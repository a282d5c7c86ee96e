"""BEiT: attention with separate q/v biases and a relative position table, per-block layer scales."""
from ._registry import register_rule, timm_types
from .layers import channel_vectors, multi_head_attention_rule

register_rule(*timm_types('timm.models.beit', 'Attention'))(multi_head_attention_rule)
register_rule(*timm_types('timm.models.beit', 'Block'))(channel_vectors('gamma_1', 'gamma_2'))
register_rule(*timm_types('timm.models.beit', 'Beit'))(channel_vectors('cls_token', 'pos_embed'))
