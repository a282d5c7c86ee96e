"""The timm-gpd checkpoint contract (docs/CONTRACTS.md), in one place.

train.py, validate.py, hfhub and the benchmarks all go through this module to

* write files atomically (``save_atomic``, ``write_atomic``, ``copy_atomic``): a temporary file
  beside the target, fsync'ed, then renamed over it; an exception, Ctrl-C or SIGTERM (see
  ``exit_on_sigterm``) removes the temporary file, so a reader sees the old file or the new one and
  no ``*.tmp`` is left behind;
* read weight files (``read_weights``: ``.pth`` with ``weights_only=True``, ``.safetensors``) and
  training checkpoints (``load_checkpoint``) with one-line errors naming the file and what is wrong;
* rebuild the trained model from a checkpoint (``build_model``) and extract the deployable student;
* write the student in timm's Hub layout (``export_student``: safetensors + config.json), the one
  writer of a student's ``config.json``;
* read ``summary.csv`` (``read_summary``) and describe the hardware of a run (``hardware_description``).

Nothing here needs the GPD core unless a checkpoint was written under ``--gpd``.
"""
import csv
import json
import os
import pickle
import shutil
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'CHECKPOINT_FORMAT', 'CHECKPOINT_VERSION', 'TRAINING_KEYS', 'MODEL_KEYS', 'CheckpointError',
    'NonFiniteWeightsError', 'write_atomic', 'save_atomic', 'copy_atomic', 'write_text_atomic', 'exit_on_sigterm',
    'read_weights', 'load_checkpoint', 'check_checkpoint',
    'state_dict_of', 'create_student', 'build_model', 'load_weights', 'is_gpd_model', 'extract_student',
    'non_finite_tensors', 'check_finite', 'student_config', 'export_student', 'read_summary', 'processor_name',
    'hardware_description', 'run_environment',
]

PathLike = Union[str, Path]

CHECKPOINT_FORMAT = 'timm-gpd-checkpoint'
CHECKPOINT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
# what resuming needs; a checkpoint that only rebuilds the model needs MODEL_KEYS
TRAINING_KEYS = ('format', 'version', 'epoch', 'arch', 'args', 'state_dict', 'optimizer', 'scheduler', 'rng',
                 'metric', 'num_classes', 'in_chans', 'img_size')
MODEL_KEYS = ('arch', 'state_dict', 'num_classes', 'in_chans')

# the eval preprocessing a student's config.json records (timm's data config names)
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
# pretrained_cfg entries that describe the stock weights a model was created with (their tag, license,
# paper, labels, test-time sizes): wrong for a student trained here, so its config.json leaves them out
SOURCE_WEIGHT_KEYS = ('tag', 'license', 'paper_ids', 'paper_name', 'origin_url', 'notes', 'label_names',
                      'label_descriptions', 'test_input_size', 'test_crop_pct', 'test_pool_size', 'hf_hub_id',
                      'hf_hub_filename', 'url', 'file', 'source', 'state_dict')


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, unreadable, or not what it should be (one-line message)."""


class NonFiniteWeightsError(CheckpointError):
    """Weights with NaN / inf entries: refused for export."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), '')
    text = text or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


# ---------------------------------------------------------------- atomic writes

def _fsync_dir(directory: Path):
    # the rename itself is durable only once the directory entry is on disk
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_path)``, fsync the result and rename it over ``path``.

    On any exception (KeyboardInterrupt and SystemExit included: see ``exit_on_sigterm``) the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save`` that leaves either the old file or the complete new one."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def copy_atomic(src: PathLike, path: PathLike) -> Path:
    """``path`` as a copy of the finished file ``src``, atomically: a hard link where the file system
    allows one (no second write of a checkpoint that can weigh gigabytes, and no second copy on disk;
    ``save_atomic`` replaces ``src`` by a new file, so the link keeps the old content), else a copy."""
    def duplicate(tmp: Path):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return write_atomic(path, duplicate)


def _write_text(path: Path, text: str):
    path.write_text(text, encoding='utf-8')


def write_text_atomic(path: PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: _write_text(tmp, text))


def exit_on_sigterm():
    """Turn SIGTERM (what ``kill``, schedulers and job queues send) into SystemExit, so that the
    cleanup of ``write_atomic`` runs instead of the process dying mid-write. Main thread only."""
    def handler(signum, _frame):
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------- reading

def read_weights(path: PathLike, what: str = 'checkpoint') -> Any:
    """The content of a ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    Raises CheckpointError with one line naming the file and the problem: missing, a folder, empty,
    truncated / not that kind of file, or holding objects weights-only loading refuses.
    """
    path = Path(path)
    label = f'{what} {path}'
    if not path.exists():
        raise CheckpointError(f'{label} does not exist')
    if path.is_dir():
        raise CheckpointError(f'{label} is a folder, not a file')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{label} is empty (0 bytes)')
    if path.suffix == '.safetensors':
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
            raise CheckpointError(f'{label} is truncated or not a safetensors file ({_one_line(e)})') from e
    not_torch = f'{label} is truncated or not a PyTorch file'
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives: this is something else
            raise CheckpointError(f'{not_torch} ({_one_line(e)})') from e
        lines = str(e).splitlines()
        reason = next((line.strip() for line in lines if 'Unsupported global' in line), _one_line(e))
        raise CheckpointError(f'{label} holds objects that weights_only=True refuses to load ({reason})') from e
    except Exception as e:  # random bytes end in IndexError, EOFError, RuntimeError, BadZipFile, ...
        raise CheckpointError(f'{not_torch} ({type(e).__name__}: {_one_line(e)})') from e


def load_checkpoint(path: PathLike, what: str = 'checkpoint', training: bool = False, hint: str = '') -> Dict[str, Any]:
    """A train.py checkpoint, checked: format, version and the keys a resume (``training=True``)
    or a model rebuild needs. ``hint`` is appended to the not-a-checkpoint error."""
    return check_checkpoint(read_weights(path, what), path, what, training, hint)


def check_checkpoint(checkpoint: Any, path: PathLike, what: str = 'checkpoint', training: bool = False,
                     hint: str = '') -> Dict[str, Any]:
    """``load_checkpoint``'s checks on what ``read_weights(path)`` returned."""
    if not isinstance(checkpoint, dict) or checkpoint.get('format') != CHECKPOINT_FORMAT:
        kind = 'training checkpoint' if training else 'checkpoint'
        raise CheckpointError(f'{what} {path} is not a timm-gpd {kind} (no format={CHECKPOINT_FORMAT!r})'
                              + (f'; {hint}' if hint else ''))
    if checkpoint.get('version') not in SUPPORTED_VERSIONS:
        raise CheckpointError(f'{what} {path} has checkpoint version {checkpoint.get("version")!r}, '
                              f'this timm-gpd reads version {CHECKPOINT_VERSION}')
    missing = [k for k in TRAINING_KEYS if training and k not in checkpoint]
    missing += [k for k in MODEL_KEYS if k not in missing and checkpoint.get(k) is None]
    if missing:
        raise CheckpointError(f'{what} {path} lacks checkpoint keys: {", ".join(missing)}')
    return checkpoint


def state_dict_of(content: Any, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The weights in what ``read_weights`` returned: a state dict itself, or the ``state_dict_ema`` /
    ``state_dict`` / ``model`` entry of a checkpoint dict (timm's conventions)."""
    if isinstance(content, dict):
        keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
        for key in keys:
            if isinstance(content.get(key), dict):
                return content[key]
    return content


# ---------------------------------------------------------------- models

def create_student(arch: str, num_classes: int, in_chans: int,
                   img_size: Optional[Union[int, Sequence[int]]] = None) -> nn.Module:
    """An untrained stock timm model with the checkpoint's head, channels and (if the arch takes it) size."""
    import timm
    from timm.models import resolve_model_input_args
    input_args = dict(in_chans=in_chans)
    if img_size is not None:
        input_args['img_size'] = img_size if isinstance(img_size, int) else tuple(img_size)
    # timm decides whether img_size is a constructor argument (ViT) or only a data setting (CNN)
    kwargs = resolve_model_input_args(arch, args=input_args, num_classes=num_classes)
    return timm.create_model(**kwargs)


def is_gpd_model(model: nn.Module) -> bool:
    # without importing the core: if it was never imported, no GPDModel can exist
    core = sys.modules.get('timm_gpd.reparam')
    return core is not None and isinstance(model, core.GPDModel)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str):
    """Strict load; the error names the source, the model it should fit, and what does not fit."""
    from timm.models import clean_state_dict
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{source} holds no state dict of tensors')
    try:
        model.load_state_dict(clean_state_dict(dict(state_dict)), strict=True)
    except RuntimeError as e:
        shape = f'num_classes={getattr(model, "num_classes", "?")}'
        in_chans = getattr(model, 'in_chans', None) or getattr(getattr(model, 'student', None), 'in_chans', None)
        if in_chans is not None:
            shape += f', in_chans={in_chans}'
        detail = ' '.join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + '...'
        raise CheckpointError(f'weights from {source} do not fit {type(model).__name__} ({shape}): {detail}') from e


def build_model(checkpoint: Dict[str, Any], use_ema: bool = False, source: str = 'checkpoint') -> nn.Module:
    """The trained model of a checkpoint (a GPDModel under --gpd, else the stock model), eval mode."""
    student = create_student(
        checkpoint['arch'], checkpoint['num_classes'], checkpoint['in_chans'], checkpoint.get('img_size'))
    model = student
    gpd_kwargs = checkpoint.get('gpd')
    if gpd_kwargs is not None:
        from timm_gpd.reparam import GPDModel
        # the loaded weights replace the initial DT wholesale, so its construction-time exactness
        # check and random symmetry noise would only cost time (noise never changes the structure)
        model = GPDModel(student, **dict(gpd_kwargs, check=False, noise=0.))
    key = 'state_dict'
    if use_ema:
        if checkpoint.get('state_dict_ema') is None:
            raise CheckpointError(f'{source} has no EMA weights (state_dict_ema)')
        key = 'state_dict_ema'
    load_weights(model, checkpoint[key], f'{source} [{key}]')
    return model.eval()


def extract_student(model: nn.Module) -> nn.Module:
    """The deployable stock timm model: the GPD student merged and sliced, or the model itself."""
    if is_gpd_model(model):
        return model.extract_student()
    return model.eval()


# ---------------------------------------------------------------- export

def non_finite_tensors(tensors: Union[nn.Module, Mapping[str, torch.Tensor]]) -> List[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    if isinstance(tensors, nn.Module):
        tensors = tensors.state_dict()
    return [name for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Union[nn.Module, Mapping[str, torch.Tensor]], what: str):
    bad = non_finite_tensors(tensors)
    if bad:
        total = len(tensors.state_dict() if isinstance(tensors, nn.Module) else tensors)
        raise NonFiniteWeightsError(
            f'{what} has non-finite values (NaN/inf) in {len(bad)} of {total} tensors '
            f'(first: {", ".join(bad[:3])}): refusing to write them')


def _plain_cfg(student: nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in (getattr(student, 'pretrained_cfg', None) or {}).items() if k not in SOURCE_WEIGHT_KEYS}


def student_config(student: nn.Module, data_config: Mapping[str, Any],
                   label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The student's config.json (timm's Hub layout: architecture, num_classes, num_features,
    model_args, pretrained_cfg, label_names). It describes the trained student only: the stock
    weights' tag, license, paper ids and labels are left out, the run's eval preprocessing is in."""
    import tempfile
    from timm.models._hub import save_config_for_hf
    model_config: Dict[str, Any] = {}
    if label_names:
        if len(label_names) != student.num_classes:
            raise ValueError(f'{len(label_names)} label names for a {student.num_classes}-class head')
        model_config['label_names'] = [str(n) for n in label_names]
    preprocessing = {k: data_config[k] for k in DATA_CONFIG_KEYS if data_config.get(k) is not None}
    source_cfg = getattr(student, 'pretrained_cfg', None)
    student.pretrained_cfg = _plain_cfg(student)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'config.json'
            save_config_for_hf(student, str(path), model_config=model_config, data_config=preprocessing)
            return json.loads(path.read_text())
    finally:
        student.pretrained_cfg = source_cfg


def export_student(student: nn.Module, out_dir: PathLike, data_config: Mapping[str, Any],
                   label_names: Optional[Sequence[str]] = None, weights_name: str = 'model.safetensors') -> Path:
    """``weights_name`` (safetensors) + ``config.json`` loadable by ``timm.create_model('local-dir:DIR' /
    'hf-hub:ORG/NAME', pretrained=True)``; each file written atomically. Refuses non-finite weights."""
    import safetensors.torch
    out_dir = Path(out_dir)
    check_finite(student, f'student {getattr(student, "pretrained_cfg", {}).get("architecture", "")}'.rstrip())
    config = student_config(student, data_config, label_names)
    # cloned so no two entries share storage (safetensors refuses), contiguous for its layout
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in student.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / weights_name, lambda tmp: safetensors.torch.save_file(tensors, str(tmp)))
    write_text_atomic(out_dir / 'config.json', json.dumps(config, indent=2))
    return out_dir


# ---------------------------------------------------------------- run records

def _number(text: Optional[str]) -> Any:
    if text is None or text == '':
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_summary(path: PathLike) -> List[Dict[str, Any]]:
    """train.py's summary.csv: one dict per row, numbers as int/float, empty cells (metrics a run
    does not have) as None. A missing file reads as no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline='') as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def processor_name() -> str:
    """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), or 'unknown CPU'."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or 'unknown CPU'


def hardware_description(device: Optional[torch.device] = None, num_processes: int = 1) -> str:
    """Human-readable hardware of a run, e.g. '4x NVIDIA H100 80GB HBM3' or 'AMD EPYC (16 cores)'."""
    device = torch.device(device) if device is not None else torch.device(
        'cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cuda':
        return f'{num_processes}x {torch.cuda.get_device_name(device)}'
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return f'{processor_name()} ({cores} cores)' + (f' x {num_processes} processes' if num_processes > 1 else '')


def run_environment(device: Optional[torch.device] = None, num_processes: int = 1,
                    mixed_precision: Optional[str] = None) -> Dict[str, Any]:
    """The checkpoint's ``env`` record: hardware plus the library versions that produced it."""
    import timm
    env = dict(hardware=hardware_description(device, num_processes), num_processes=num_processes,
               torch=str(torch.__version__), timm=str(timm.__version__), python=sys.version.split()[0])
    if mixed_precision and mixed_precision != 'no':
        env['mixed_precision'] = str(mixed_precision)
    return env
