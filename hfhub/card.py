"""Model card (README.md) for a student published from a train.py run, built with huggingface_hub's
ModelCard / ModelCardData / EvalResult so the Hub renders its metadata and metrics."""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from timm_gpd.checkpoint import read_summary

__all__ = ['RunRecord', 'read_run', 'epoch_metrics', 'headline_metrics', 'wall_time', 'card_data', 'render_card']

_logger = logging.getLogger(__name__)

# timm dataset names -> Hugging Face dataset ids, so the card links to the data on the Hub
_HF_DATASET_IDS = {
    'torch/fashion_mnist': 'zalando-datasets/fashion_mnist',
    'torch/mnist': 'ylecun/mnist',
    'torch/cifar10': 'uoft-cs/cifar10',
    'torch/cifar100': 'uoft-cs/cifar100',
}
_CITATION = """@inproceedings{guo2025gpd,
  title={Gap Preserving Distillation by Building Bidirectional Mappings with A Dynamic Teacher},
  author={Guo, Yong and Zhang, Shulian and Pan, Haolin and Liu, Jing and Zhang, Yulun and Chen, Jian},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2025}
}"""


@dataclass
class RunRecord:
    """What a train.py output folder says about the run that produced a checkpoint."""
    checkpoint: Path
    arch: str
    num_classes: int
    in_chans: int
    img_size: Any = None
    epoch: Optional[int] = None
    gpd: Optional[Dict[str, Any]] = None
    args: Dict[str, Any] = field(default_factory=dict)
    args_source: str = 'checkpoint'
    summary: List[Dict[str, Any]] = field(default_factory=list)
    ema: bool = False  # the published weights are the EMA ones
    env: Dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> Optional[str]:
        return self.args.get('dataset')


def read_run(checkpoint_path: Path, checkpoint: Dict[str, Any], ema: bool = False) -> RunRecord:
    """Collect args (args.yaml beside the checkpoint, else the checkpoint's copy) and summary.csv rows."""
    run_dir = Path(checkpoint_path).parent
    args, args_source = dict(checkpoint.get('args') or {}), 'checkpoint'
    args_file = run_dir / 'args.yaml'
    if args_file.is_file():
        # the file train.py wrote is the exact record; the checkpoint copy may be normalized
        args, args_source = yaml.safe_load(args_file.read_text()) or {}, 'args.yaml'
    summary = read_summary(run_dir / 'summary.csv')
    if not summary:
        _logger.warning('No summary.csv beside %s: the model card will have no metrics.', checkpoint_path)
    return RunRecord(
        checkpoint=Path(checkpoint_path),
        arch=checkpoint['arch'],
        num_classes=checkpoint['num_classes'],
        in_chans=checkpoint['in_chans'],
        img_size=checkpoint.get('img_size'),
        epoch=checkpoint.get('epoch'),
        gpd=checkpoint.get('gpd'),
        args=args,
        args_source=args_source,
        summary=summary,
        ema=ema,
        env=dict(checkpoint.get('env') or {}),
    )


def epoch_metrics(run: RunRecord) -> Dict[str, Any]:
    """eval_* (and test_*) columns of the summary row for the checkpoint's epoch (empty if not logged)."""
    rows = [r for r in run.summary if r.get('epoch') == run.epoch]
    if not rows:
        if run.summary:
            _logger.warning('summary.csv has no row for epoch %s of %s.', run.epoch, run.checkpoint)
        return {}
    # summary.csv keeps float noise (90.88000000000001); 4 decimals say all a metric means
    return {k: round(v, 4) if isinstance(v, float) else v
            for k, v in rows[-1].items() if k.startswith(('eval_', 'test_'))}


def holdout_scored(run: RunRecord) -> bool:
    """A run that validated on the held-out tail of its training split (train.py --val-holdout) and
    scored the dataset's evaluation split as test_*: its eval_* columns are not the evaluation split's."""
    return bool(run.args.get('val_holdout')) and isinstance(epoch_metrics(run).get('test_top1'), (int, float))


def headline_metrics(run: RunRecord) -> Dict[str, float]:
    """Top-1/top-5 of the published weights on the evaluation split: train.py logs it as eval_*, or
    as test_* when validation was held out of the training split; the EMA student as *_ema_*."""
    metrics = epoch_metrics(run)
    base = 'test_' if holdout_scored(run) else 'eval_'
    prefix = f'{base}ema_' if run.ema and isinstance(metrics.get(f'{base}ema_top1'), (int, float)) else base
    named = {'Top-1 accuracy': metrics.get(f'{prefix}top1'), 'Top-5 accuracy': metrics.get(f'{prefix}top5')}
    return {k: v for k, v in named.items() if isinstance(v, (int, float))}


def wall_time(run: RunRecord) -> Optional[str]:
    """Training time up to the checkpoint's epoch, from summary.csv's epoch_time (seconds)."""
    times = [r['epoch_time'] for r in run.summary
             if isinstance(r.get('epoch_time'), (int, float)) and (run.epoch is None or r.get('epoch', 0) <= run.epoch)]
    if not times:
        return None
    total = sum(times)
    hours, rest = divmod(int(round(total)), 3600)
    return f'{hours}h {rest // 60:02d}m {rest % 60:02d}s ({total:.1f} s over {len(times)} epochs)'


def _teacher(run: RunRecord) -> Optional[str]:
    return run.args.get('teacher') or None


def _method(run: RunRecord) -> str:
    if run.gpd is None:
        return 'knowledge distillation' if _teacher(run) else 'plain training'
    if run.gpd.get('cbr_only'):
        return 'CBR only (multi-branch re-parameterization, no dynamic teacher)'
    return f'GPD, dynamic teacher ratio {run.gpd.get("ratio")}'


def card_data(run: RunRecord, repo_id: str, license: str) -> ModelCardData:
    """The card's metadata: library, license, tags, datasets, and the headline metrics as eval results."""
    tags = ['image-classification', 'timm', 'timm-gpd']
    if run.gpd is not None or _teacher(run):
        tags += ['knowledge-distillation']
    if run.gpd is not None:
        tags += ['gap-preserving-distillation']
    dataset_id = _HF_DATASET_IDS.get((run.dataset or '').lower(), run.dataset) or None
    split = run.args.get('val_split') or 'validation'
    if (run.dataset or '').lower() in _HF_DATASET_IDS:
        # torchvision's non-train split of these datasets is what their Hub copies call 'test'
        split = 'train' if split in ('train', 'training') else 'test'
    results = [
        EvalResult(task_type='image-classification', task_name='Image Classification',
                   dataset_type=dataset_id or 'unknown', dataset_name=dataset_id or 'unknown', dataset_split=split,
                   metric_type='accuracy', metric_name=name, metric_value=value)
        for name, value in headline_metrics(run).items()]
    return ModelCardData(
        library_name='timm', license=license, pipeline_tag='image-classification', tags=tags,
        datasets=[dataset_id] if dataset_id else None, metrics=['accuracy'] if results else None,
        model_name=repo_id.split('/')[-1] if results else None, eval_results=results or None)


def _details(run: RunRecord, student_info: Dict[str, Any]) -> List[Tuple[str, Any]]:
    gpd = run.gpd or {}
    rows = [
        ('Architecture', f'`{run.arch}` (stock timm model; loading needs no timm-gpd)'),
        ('Method', _method(run)),
        ('Static teacher', f'`{_teacher(run)}`' if _teacher(run) else 'none'),
        ('Dynamic teacher ratio', gpd.get('ratio', 'n/a')),
        ('Channel-branch reparameterization', f'{gpd.get("cbr")} (init: {gpd.get("cbr_init")})' if gpd else 'n/a'),
        ('Dataset', run.dataset or 'not recorded'),
        ('Classes', run.num_classes),
        ('Input', f'{run.in_chans} channel(s), {student_info.get("input_size", run.img_size)}'),
        ('Params (M)', student_info.get('params_m')),
        ('Epochs trained', run.epoch + 1 if isinstance(run.epoch, int) else 'not recorded'),
        ('Seed', run.args.get('seed', 'not recorded')),
        ('Dynamic teacher seed', gpd.get('seed', 'n/a')),
        ('Wall time', wall_time(run) or 'not recorded'),
        ('Hardware', run.env.get('hardware') or 'not recorded'),
        ('Weights', 'EMA of the student' if run.ema else 'the student (no EMA)'),
    ]
    return [(k, v) for k, v in rows if v is not None]


def _cell(value: Any) -> str:
    if value is None:
        return ''
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def _summary_table(summary: List[Dict[str, Any]]) -> str:
    if not summary:
        return 'No summary.csv was found beside the checkpoint.\n'
    cols = list(summary[0].keys())
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    lines += ['| ' + ' | '.join(_cell(r.get(c, '')) for c in cols) + ' |' for r in summary]
    return '\n'.join(lines) + '\n'


def _notes(notes: Optional[str]) -> str:
    return f'\n{notes.strip()}\n' if notes and notes.strip() else ''


def render_card(run: RunRecord, repo_id: str, license: str, student_info: Optional[Dict[str, Any]] = None,
                notes: Optional[str] = None) -> ModelCard:
    """The model card: metadata (``card_data``), details, results, ``notes`` (markdown of the
    publisher's, e.g. how the model compares in a study), usage, exact args, per-epoch summary,
    citation."""
    student_info = student_info or {}
    name = repo_id.split('/')[-1]
    metrics = {k: v for k, v in epoch_metrics(run).items() if v is not None}
    details = '\n'.join(f'- **{k}:** {v}' for k, v in _details(run, student_info))
    results = '\n'.join(f'- {k}: {v}' for k, v in metrics.items()) or '- not logged'
    if holdout_scored(run):
        results = (f"eval_*: the last {run.args['val_holdout']:,} training images, held out (every choice was "
                   "made on them); test_*: the evaluation split, never used for a choice.\n\n" + results)
    args_yaml = yaml.safe_dump(run.args, sort_keys=True, allow_unicode=True).rstrip()
    body = f"""
# Model card for {name}

A `{run.arch}` image classifier trained with timm-gpd ({_method(run)}) and exported as a plain timm
model: the dynamic teacher and the multi-branch convolutions are merged away.

## Model Details
{details}

## Results (epoch {run.epoch}, from summary.csv)
{results}
{_notes(notes)}
## Model Usage
```python
import timm, torch

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
# logits = model(transform(img).unsqueeze(0))
```

## Training arguments
Exact arguments of the run (from `{run.args_source}`):
```yaml
{args_yaml}
```

## Training log (summary.csv)
{_summary_table(run.summary)}
## Citation
```bibtex
{_CITATION}
```
"""
    return ModelCard(f'---\n{card_data(run, repo_id, license).to_yaml()}\n---\n{body}')
