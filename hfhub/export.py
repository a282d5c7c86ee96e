"""Write an extracted student in timm's Hub layout (model.safetensors + config.json)."""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torchvision import datasets
from timm.data import resolve_input_data_config
from timm.models import save_for_hf

__all__ = ['data_config_from_args', 'label_names_for', 'published_pretrained_cfg', 'save_student']

# describe the weights they came with; wrong once the student is retrained
_SOURCE_WEIGHT_KEYS = ('tag', 'license', 'paper_ids', 'paper_name', 'origin_url', 'notes', 'label_names',
                       'label_descriptions', 'test_input_size', 'test_crop_pct', 'test_pool_size')
_TORCH_CLASS_NAMED = {'mnist': datasets.MNIST, 'kmnist': datasets.KMNIST, 'fashion_mnist': datasets.FashionMNIST}
_DATA_ARG_KEYS = ('img_size', 'input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


def data_config_from_args(model: torch.nn.Module, args: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Eval preprocessing for `model` from run/CLI args; timm's resolver also fits mean/std to in_chans."""
    args = {k: v for k, v in (args or {}).items() if k in _DATA_ARG_KEYS and v is not None}
    return resolve_input_data_config(model, args=args)


def label_names_for(run_dir: Union[str, Path], dataset: Optional[str], num_classes: int) -> Optional[List[str]]:
    """Class names for the head: train.py's config.json in the run folder, else a torchvision dataset's own.

    None when neither is known or they do not fit the head.
    """
    config_file = Path(run_dir) / 'config.json'
    names = None
    if config_file.is_file():
        names = json.loads(config_file.read_text()).get('label_names')
    if not names and dataset and dataset.lower().startswith('torch/'):
        # only the MNIST family declares its classes on the class; the others read them from disk
        ds_class = _TORCH_CLASS_NAMED.get(dataset.split('/', 1)[1].lower())
        names = getattr(ds_class, 'classes', None)
    return list(names) if names and len(names) == num_classes else None


def published_pretrained_cfg(student: torch.nn.Module, tag: str, license: str) -> Dict[str, Any]:
    """The student's pretrained_cfg minus what described the stock weights, plus our tag and license."""
    cfg = {k: v for k, v in student.pretrained_cfg.items() if k not in _SOURCE_WEIGHT_KEYS}
    cfg.update(tag=tag, license=license)
    return cfg


def save_student(
        student: torch.nn.Module,
        out_dir: Union[str, Path],
        data_config: Dict[str, Any],
        tag: str,
        license: str,
        label_names: Optional[Sequence[str]] = None,
) -> Path:
    """model.safetensors + config.json loadable by timm.create_model('hf-hub:...' / 'local-dir:...').

    The student's pretrained_cfg is replaced by the published one, so the object in memory describes
    the same weights as the folder.
    """
    student.pretrained_cfg = published_pretrained_cfg(student, tag, license)
    model_config = {}
    if label_names:
        if len(label_names) != student.num_classes:
            raise ValueError(f'{len(label_names)} label names for a {student.num_classes}-class head.')
        model_config['label_names'] = list(label_names)
    save_for_hf(student, out_dir, model_config=model_config, safe_serialization=True, data_config=data_config)
    return Path(out_dir)
