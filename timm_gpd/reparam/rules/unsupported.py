"""timm blocks refused up front, with the reason.

Their forward groups channels by a fixed head count or splits them into groups that channel
segments of copies cannot follow: without this table the DT's forward fails with a shape error of
its own, or the exactness check names them only after the whole DT was built.
"""
from ._registry import register_unsupported, timm_types

UNSUPPORTED_TIMM_BLOCKS = (
    ('timm.models.coat', 'ConvRelPosEnc', 'splits its channels into head groups of fixed sizes, one kernel each'),
    ('timm.models.edgenext', 'SplitTransposeBlock',
     'chunks its channels into scales whose sizes (a ceil division) do not grow in step with the width'),
    ('timm.models.volo', 'OutlookAttention', 'reshapes its values into per-head unfolded windows of a fixed head count'),
    ('timm.models.tnt', 'PixelEmbed', 'reshapes its pixel features with a fixed inner width'),
    ('timm.models.tnt', 'Block', "flattens its pixel tokens (pixels x inner channels) into the outer token's channels"),
    ('timm.models.swiftformer', 'EfficientAdditiveAttention',
     'L2-normalizes its queries and keys over channels (r copies have sqrt(r) times the norm)'),
    ('timm.models.nest', 'Attention', 'lays its output channels out head-minor (head_dim x heads)'),
)

for _module, _name, _reason in UNSUPPORTED_TIMM_BLOCKS:
    for _type in timm_types(_module, _name):
        register_unsupported(_type, _reason)
