"""Shared construction of the ``gpd_*`` entrypoints: a stock timm student wrapped in a GPDModel."""
from typing import Any, Dict

import timm
import torch.nn as nn
from timm.models._builder import resolve_pretrained_cfg

from ..reparam.model import GPDModel

# timm-style kwargs of the wrapper; everything else goes to the student (num_classes, in_chans, drop_rate...)
GPD_KWARGS = {
    'gpd_ratio': 'ratio',
    'gpd_cbr': 'cbr',
    'gpd_cbr_init': 'cbr_init',
    'gpd_cbr_only': 'cbr_only',
    'gpd_noise': 'noise',
    'gpd_seed': 'seed',
    'gpd_check': 'check',
}
# pretrained_cfg fields that describe the student's weights, handed to timm when loading them
_STUDENT_WEIGHT_KEYS = ('hf_hub_id', 'hf_hub_filename', 'url', 'file', 'state_dict', 'num_classes',
                        'label_names', 'mean', 'std', 'input_size', 'crop_pct', 'interpolation')


# where timm-gpd publishes its distilled students (``python -m hfhub.publish``)
HUB_ORG = 'timm-gpd'
# Fashion-MNIST as the published students see it: 1 channel at 32 px, the training set's statistics
FMNIST_DATA_CFG = dict(
    num_classes=10, input_size=(1, 32, 32), mean=(0.2860,), std=(0.3530,), crop_pct=1.0,
    interpolation='bilinear', pool_size=None, license='apache-2.0')


def stock_weights_cfg(stock_tag: str, **kwargs) -> Dict[str, Any]:
    """A ``gpd_*`` tag whose student starts from timm's own weights (e.g. ``resnet18.a1_in1k``)."""
    cfg = timm.models.get_pretrained_cfg(stock_tag).to_dict()
    for key in ('architecture', 'tag'):  # generate_default_cfgs fills these in for the gpd name
        cfg.pop(key, None)
    cfg.update(kwargs)
    return cfg


def fmnist_cfg(student_arch: str, **kwargs) -> Dict[str, Any]:
    """A ``gpd_*`` tag whose student starts from our Fashion-MNIST student on the Hub."""
    return gpd_cfg(hf_hub_id=f'{HUB_ORG}/{student_arch}.gpd_fmnist', **dict(FMNIST_DATA_CFG, **kwargs))


def gpd_cfg(**kwargs) -> Dict[str, Any]:
    """A ``gpd_*`` pretrained cfg: the student's defaults plus where the student's weights live."""
    cfg = dict(
        url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation='bilinear', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv='conv1', classifier='fc', license='apache-2.0')
    cfg.update(kwargs)
    return cfg


def is_gpd_model_name(model_name: str) -> bool:
    """True for a registered ``gpd_*`` name, with or without a pretrained tag."""
    from timm.models import parse_model_name, split_model_name_tag
    source, name = parse_model_name(model_name)
    if source is not None:
        return False  # hf-hub: / local-dir: models are stock timm models
    base = split_model_name_tag(name)[0]
    return base.startswith('gpd_') and timm.is_model(base)


def gpd_student_arch(model_name: str) -> str:
    """The stock timm architecture a ``gpd_*`` model trains: every entrypoint is named
    ``gpd_`` + its student's timm name (``gpd_resnet18.fmnist`` -> ``resnet18``)."""
    from timm.models import split_model_name_tag
    if not is_gpd_model_name(model_name):
        raise ValueError(f'{model_name!r} is not a registered gpd_* model')
    return split_model_name_tag(model_name)[0][len('gpd_'):]


def split_gpd_kwargs(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pop the wrapper's ``gpd_*`` kwargs out of ``kwargs``; returns them as GPDModel arguments."""
    gpd_args = {GPD_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in GPD_KWARGS}
    unknown = sorted(k for k in kwargs if k.startswith('gpd_'))
    if unknown:
        raise TypeError(f'{variant}: unknown GPD argument(s) {unknown}; expected some of {sorted(GPD_KWARGS)}')
    return gpd_args


def _variant_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    # the pretrained cfg timm hands an entrypoint (a tag string, a cfg, an overlay), resolved;
    # ``variant`` may carry the tag itself ('gpd_resnet18.fmnist')
    return resolve_pretrained_cfg(
        variant, kwargs.pop('pretrained_cfg', None), kwargs.pop('pretrained_cfg_overlay', None)).to_dict()


def _create_student(variant: str, cfg: Dict[str, Any], student_arch: str, pretrained: bool, **kwargs) -> nn.Module:
    if not pretrained:
        return timm.create_model(student_arch, pretrained=False, **kwargs)
    overlay = {k: cfg[k] for k in _STUDENT_WEIGHT_KEYS if cfg.get(k)}
    try:
        return timm.create_model(student_arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as e:  # the Hub client's missing-file errors are OSErrors
        source = overlay.get('hf_hub_id') or overlay.get('file') or overlay.get('url') or student_arch
        raise FileNotFoundError(
            f"{variant}: the student's pretrained weights ({source}) could not be loaded ({e}). "
            f'Offline (HF_HUB_OFFLINE=1)? Put a published folder in the Hugging Face cache first '
            f'(`python -m hfhub.cache FOLDER --repo-id {source}`), or pass '
            f"pretrained_cfg_overlay=dict(file='PATH/model.safetensors').") from e


def _wrap(variant: str, cfg: Dict[str, Any], student: nn.Module, **gpd_args) -> GPDModel:
    model = GPDModel(student, **gpd_args)
    cfg = dict(cfg, architecture=variant.split('.')[0], first_conv=student.pretrained_cfg.get('first_conv'),
               classifier=student.pretrained_cfg.get('classifier'), num_classes=model.num_classes)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


def create_gpd_student(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """The stock student of the ``gpd_*`` model ``model_name`` (tag allowed): what
    ``timm.create_model(model_name, pretrained=...)`` wraps, before wrapping. With ``pretrained``,
    the weights the tag names (e.g. ``gpd_resnet18`` -> ``resnet18.a1_in1k``)."""
    cfg = _variant_cfg(model_name, kwargs)
    return _create_student(model_name, cfg, gpd_student_arch(model_name), pretrained, **kwargs)


def wrap_gpd_student(model_name: str, student: nn.Module, **gpd_args) -> GPDModel:
    """Wrap a stock student (e.g. from :func:`create_gpd_student`, then loaded with other weights)
    as the ``gpd_*`` model ``model_name``; ``gpd_args`` are GPDModel arguments (ratio, cbr, ...)."""
    return _wrap(model_name, _variant_cfg(model_name, {}), student, **gpd_args)


def build_gpd_model(variant: str, student_arch: str, pretrained: bool = False, **kwargs) -> GPDModel:
    """Create ``student_arch`` with timm (weights from the variant's cfg when ``pretrained``), then
    wrap it. Pretrained students start CBR from their kernels (fine-tune init) unless told otherwise."""
    cfg = _variant_cfg(variant, kwargs)
    gpd_args = split_gpd_kwargs(variant, kwargs)
    if pretrained:
        gpd_args.setdefault('cbr_init', 'finetune')
    student = _create_student(variant, cfg, student_arch, pretrained, **kwargs)
    return _wrap(variant, cfg, student, **gpd_args)
