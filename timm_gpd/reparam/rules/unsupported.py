"""timm blocks refused up front, with the reason.

Their forward splits, concatenates or reshapes channels by count: without this table the DT's
forward fails with a shape error of its own, or the exactness check names them only after the
whole DT was built.
"""
from ._registry import register_unsupported, timm_types

CONCAT_BRANCHES = 'concatenates its branches'
UNSUPPORTED_TIMM_BLOCKS = (
    ('timm.models.inception_v3', 'InceptionA', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionB', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionC', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionD', CONCAT_BRANCHES),
    ('timm.models.inception_v3', 'InceptionE', CONCAT_BRANCHES),
    *(('timm.models.inception_v4', n, CONCAT_BRANCHES) for n in (
        'Mixed3a', 'Mixed4a', 'Mixed5a', 'InceptionA', 'ReductionA', 'InceptionB', 'ReductionB', 'InceptionC')),
    *(('timm.models.inception_resnet_v2', n, CONCAT_BRANCHES) for n in (
        'Mixed_5b', 'Block35', 'Mixed_6a', 'Block17', 'Mixed_7a', 'Block8')),
    *(('timm.models.nasnet', n, 'concatenates the outputs of its cell branches') for n in (
        'CellStem0', 'CellStem1', 'FirstCell', 'NormalCell', 'ReductionCell0', 'ReductionCell1')),
    *(('timm.models.pnasnet', n, 'concatenates the outputs of its cell branches') for n in ('CellStem0', 'Cell')),
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
