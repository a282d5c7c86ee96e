"""What a published student's config.json needs from a run: its eval preprocessing and class names.

train.py records both in the checkpoint (``data_config``, ``label_names``); for checkpoints without
them they are rebuilt from the run's arguments, train.py's config.json, or a torchvision dataset.
The writer itself is ``timm_gpd.checkpoint.export_student``, shared with train.py.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torchvision import datasets
from timm.data import resolve_input_data_config

__all__ = ['data_config_from_args', 'label_names_for', 'run_data_config', 'run_label_names']

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
        try:
            names = json.loads(config_file.read_text()).get('label_names')
        except (ValueError, AttributeError):
            names = None  # not train.py's: ignore it
    if not names and dataset and dataset.lower().startswith('torch/'):
        # only the MNIST family declares its classes on the class; the others read them from disk
        ds_class = _TORCH_CLASS_NAMED.get(dataset.split('/', 1)[1].lower())
        names = getattr(ds_class, 'classes', None)
    return list(names) if names and len(names) == num_classes else None


def run_data_config(checkpoint: Dict[str, Any], student: torch.nn.Module, args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py evaluated with: recorded in the checkpoint, else resolved from its args."""
    if checkpoint.get('data_config'):
        return dict(checkpoint['data_config'])
    return data_config_from_args(student, dict(args, img_size=checkpoint.get('img_size')))


def run_label_names(checkpoint: Dict[str, Any], run_dir: Union[str, Path], dataset: Optional[str]) -> Optional[List[str]]:
    if checkpoint.get('label_names'):
        return list(checkpoint['label_names'])
    return label_names_for(run_dir, dataset, checkpoint['num_classes'])
