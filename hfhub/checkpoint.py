"""Read train.py checkpoints (docs/CONTRACTS.md) and rebuild the model they hold.

Shared by validate.py and hfhub.publish. `timm_gpd` is imported only for checkpoints
written under --gpd, so stock checkpoints and extracted students never need it.
"""
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import timm
from timm.models import clean_state_dict, resolve_model_input_args

__all__ = ['CHECKPOINT_FORMAT', 'CheckpointError', 'load_checkpoint', 'create_student', 'build_model',
           'load_weights', 'extract_student', 'is_gpd_model']

CHECKPOINT_FORMAT = 'timm-gpd-checkpoint'
SUPPORTED_VERSIONS = (1,)
_REQUIRED_KEYS = ('arch', 'state_dict', 'num_classes', 'in_chans')


class CheckpointError(ValueError):
    """A checkpoint file exists but is unreadable or not in the expected format."""


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load and check a train.py checkpoint (a dict with format='timm-gpd-checkpoint')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    try:
        # weights_only keeps a downloaded or shared checkpoint from running arbitrary pickled code
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'Cannot read checkpoint {path}: {type(e).__name__}: {e}') from e
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f'{path} is not a timm-gpd checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r}). '
            f'For a plain state dict pass --model ARCH with --checkpoint.')
    if checkpoint.get('version') not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f'{path} has checkpoint version {checkpoint.get("version")!r}; this code reads {SUPPORTED_VERSIONS}.')
    missing = [k for k in _REQUIRED_KEYS if checkpoint.get(k) is None]
    if missing:
        raise CheckpointError(f'{path} is missing required entries: {", ".join(missing)}.')
    return checkpoint


def create_student(
        arch: str,
        num_classes: int,
        in_chans: int,
        img_size: Optional[Union[int, tuple, list]] = None,
) -> torch.nn.Module:
    """Create an untrained stock timm model with the checkpoint's head, channels and (if the arch needs it) size."""
    input_args = dict(in_chans=in_chans)
    if img_size is not None:
        input_args['img_size'] = img_size if isinstance(img_size, int) else tuple(img_size)
    # timm decides whether img_size is a constructor argument (ViT) or only a data setting (CNN)
    kwargs = resolve_model_input_args(arch, args=input_args, num_classes=num_classes)
    return timm.create_model(**kwargs)


def is_gpd_model(model: torch.nn.Module) -> bool:
    # without importing timm_gpd: if it was never imported, no GPDModel can exist
    gpd = sys.modules.get('timm_gpd')
    return gpd is not None and isinstance(model, gpd.GPDModel)


def build_model(checkpoint: Dict[str, Any], use_ema: bool = False, source: str = 'checkpoint') -> torch.nn.Module:
    """Rebuild the trained model (a GPDModel under --gpd, else the stock model) in eval mode."""
    student = create_student(
        checkpoint['arch'], checkpoint['num_classes'], checkpoint['in_chans'], checkpoint.get('img_size'))
    model = student
    gpd_kwargs = checkpoint.get('gpd')
    if gpd_kwargs is not None:
        import timm_gpd
        # the loaded weights replace the initial DT wholesale, so its construction-time exactness
        # check and random symmetry noise would only cost time (noise never changes the structure)
        model = timm_gpd.GPDModel(student, **dict(gpd_kwargs, check=False, noise=0.))

    key = 'state_dict'
    if use_ema:
        if checkpoint.get('state_dict_ema') is None:
            raise CheckpointError(f'{source} has no EMA weights (state_dict_ema); drop the EMA option.')
        key = 'state_dict_ema'
    load_weights(model, checkpoint[key], f'{source} [{key}]')
    return model.eval()


def load_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that says what the weights were expected to fit."""
    try:
        model.load_state_dict(clean_state_dict(state_dict), strict=True)
    except RuntimeError as e:
        shape = f'num_classes={getattr(model, "num_classes", "?")}'
        if hasattr(model, 'in_chans'):
            shape += f', in_chans={model.in_chans}'
        raise CheckpointError(
            f'Weights from {source} do not fit {type(model).__name__} ({shape}). '
            f'Check --model/--num-classes/--in-chans/--img-size against the training run.\n{e}') from e


def extract_student(model: torch.nn.Module) -> torch.nn.Module:
    """The deployable stock timm model: the GPD student merged and sliced, or the model itself."""
    if is_gpd_model(model):
        return model.extract_student()
    return model.eval()
