"""GPD MobileNets (V1, V2): depthwise convs widen group-wise, pointwise convs densely."""
from timm.models import generate_default_cfgs, register_model

from ._builder import build_gpd_model, gpd_cfg


def _cfg(**kwargs):
    return gpd_cfg(first_conv='conv_stem', classifier='classifier', **kwargs)


default_cfgs = generate_default_cfgs({
    'gpd_mobilenetv1_100': _cfg(),
    'gpd_mobilenetv2_100': _cfg(),
})


@register_model
def gpd_mobilenetv1_100(pretrained=False, **kwargs):
    """MobileNet-V1 1.0 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_mobilenetv1_100', 'mobilenetv1_100', pretrained, **kwargs)


@register_model
def gpd_mobilenetv2_100(pretrained=False, **kwargs):
    """MobileNet-V2 1.0 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)
