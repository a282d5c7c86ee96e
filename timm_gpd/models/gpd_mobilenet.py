"""GPD MobileNets (V1, V2): depthwise convs widen group-wise, pointwise convs densely."""
from timm.models import generate_default_cfgs, register_model

from ._builder import build_gpd_model, fmnist_cfg, stock_weights_cfg

default_cfgs = generate_default_cfgs({
    'gpd_mobilenetv1_100.ra4_e3600_r224_in1k': stock_weights_cfg('mobilenetv1_100.ra4_e3600_r224_in1k'),
    'gpd_mobilenetv2_100.ra_in1k': stock_weights_cfg('mobilenetv2_100.ra_in1k'),
    'gpd_mobilenetv2_100.fmnist': fmnist_cfg('mobilenetv2_100', first_conv='conv_stem', classifier='classifier'),
})


@register_model
def gpd_mobilenetv1_100(pretrained=False, **kwargs):
    """MobileNet-V1 1.0 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_mobilenetv1_100', 'mobilenetv1_100', pretrained, **kwargs)


@register_model
def gpd_mobilenetv2_100(pretrained=False, **kwargs):
    """MobileNet-V2 1.0 student, GPD dynamic teacher."""
    return build_gpd_model('gpd_mobilenetv2_100', 'mobilenetv2_100', pretrained, **kwargs)
