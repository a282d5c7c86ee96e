"""GPD Vision Transformers (ViT, DeiT): heads x ratio with head_dim unchanged; integer ratios only
(LayerNorm over channels is exact only when every channel has the same number of copies)."""
from timm.models import generate_default_cfgs, register_model

from ._builder import build_gpd_model, gpd_cfg


def _cfg(**kwargs):
    return gpd_cfg(
        first_conv='patch_embed.proj', classifier='head', pool_size=None, fixed_input_size=True,
        crop_pct=0.9, interpolation='bicubic', **kwargs)


_INCEPTION_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

default_cfgs = generate_default_cfgs({
    'gpd_vit_tiny_patch16_224': _cfg(**_INCEPTION_MEAN_STD),
    'gpd_deit_tiny_patch16_224': _cfg(),
    'gpd_deit_small_patch16_224': _cfg(),
})


@register_model
def gpd_vit_tiny_patch16_224(pretrained=False, **kwargs):
    """ViT-Ti/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_vit_tiny_patch16_224', 'vit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def gpd_deit_tiny_patch16_224(pretrained=False, **kwargs):
    """DeiT-Ti/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_deit_tiny_patch16_224', 'deit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def gpd_deit_small_patch16_224(pretrained=False, **kwargs):
    """DeiT-S/16 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_deit_small_patch16_224', 'deit_small_patch16_224', pretrained, **kwargs)
