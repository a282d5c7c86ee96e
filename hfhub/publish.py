"""Publish the student of a train.py checkpoint to the Hugging Face Hub as a stock timm model.

    python -m hfhub.publish --checkpoint output/EXP/last.pth --repo-id ORG/resnet18.gpd_fmnist \\
        [--private] [--dry-run DIR [--overwrite]] [--card-notes NOTES.md]

Writes model.safetensors + config.json (timm_gpd.checkpoint.export_student, the writer train.py uses
too) and a model card README.md, then uploads the folder (HfApi.create_repo + upload_folder; token
from HF_TOKEN or `hf auth login`). --dry-run DIR only writes the folder; files already in DIR are
never replaced unless --overwrite is given.
"""
import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from timm_gpd.checkpoint import (
    CheckpointError, build_model, export_student, extract_student, load_checkpoint, write_text_atomic)
from .card import read_run, render_card
from .export import run_data_config, run_label_names

__all__ = ['PUBLISHED_FILES', 'PublishError', 'check_repo_id', 'export_checkpoint', 'upload_folder', 'publish',
           'main']

_logger = logging.getLogger(__name__)

PUBLISHED_FILES = ('model.safetensors', 'config.json', 'README.md')
_NOT_A_CHECKPOINT_HINT = 'publish a checkpoint that train.py wrote (output/EXP/last.pth or model_best.pth)'


class PublishError(ValueError):
    """A bad repo id or an output folder that would lose files (one-line message)."""


def check_repo_id(repo_id: str) -> str:
    """huggingface_hub's own check: 'NAME' or 'ORG/NAME' of letters, digits, '-', '_', '.'."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f'invalid --repo-id {repo_id!r}: {" ".join(str(e).split())}') from e
    return repo_id


def _student_info(student, data_config: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        params_m=round(sum(p.numel() for p in student.parameters()) / 1e6, 3),
        input_size=tuple(data_config['input_size']),
    )


def _check_out_dir(out_dir: Path, overwrite: bool):
    if out_dir.exists() and not out_dir.is_dir():
        raise PublishError(f'{out_dir} exists and is not a folder')
    existing = [name for name in PUBLISHED_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise PublishError(f'{out_dir} already has {", ".join(existing)}: choose an empty or new folder, '
                           'or pass --overwrite to replace them')


def export_checkpoint(
        checkpoint_path: Union[str, Path],
        out_dir: Union[str, Path],
        repo_id: str,
        license: str = 'apache-2.0',
        use_ema: Optional[bool] = None,
        overwrite: bool = False,
        card_notes: Optional[str] = None,
) -> Path:
    """Write the checkpoint's extracted student and its model card (PUBLISHED_FILES) to `out_dir`;
    `card_notes` (markdown) becomes a section of the card, after its results.

    use_ema=None takes the EMA weights when the checkpoint has them, as train.py does for its
    student.safetensors. Other files in `out_dir` are left alone; PUBLISHED_FILES already there are
    replaced only with `overwrite`.
    """
    check_repo_id(repo_id)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    checkpoint = load_checkpoint(checkpoint_path, hint=_NOT_A_CHECKPOINT_HINT)
    if use_ema is None:
        use_ema = checkpoint.get('state_dict_ema') is not None
    model = build_model(checkpoint, use_ema=use_ema, source=str(checkpoint_path))
    student = extract_student(model)
    run = read_run(Path(checkpoint_path), checkpoint, ema=use_ema)
    data_config = run_data_config(checkpoint, student, run.args)
    label_names = run_label_names(checkpoint, run.checkpoint.parent, run.dataset)
    card = render_card(run, repo_id, license, _student_info(student, data_config), notes=card_notes)
    export_student(student, out_dir, data_config, label_names)
    write_text_atomic(out_dir / 'README.md', str(card))
    return out_dir


def upload_folder(api, folder: Union[str, Path], repo_id: str, private: bool = False,
                  commit_message: str = 'Add timm-gpd student', revision: Optional[str] = None):
    """Create the repo if needed and upload `folder`; `api` is a huggingface_hub.HfApi (or a test fake)."""
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    # the Hub may resolve an implicit owner, so upload where it says the repo is
    repo_id = getattr(repo_url, 'repo_id', repo_id)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision)


def publish(
        checkpoint_path: Union[str, Path],
        repo_id: str,
        private: bool = False,
        dry_run: Optional[Union[str, Path]] = None,
        license: str = 'apache-2.0',
        use_ema: Optional[bool] = None,
        api=None,
        commit_message: str = 'Add timm-gpd student',
        revision: Optional[str] = None,
        overwrite: bool = False,
        card_notes: Optional[str] = None,
):
    """Export, then upload unless `dry_run` (the folder to keep) is given. Returns the folder or the commit."""
    if dry_run is not None:
        return export_checkpoint(checkpoint_path, dry_run, repo_id, license, use_ema, overwrite, card_notes)
    check_repo_id(repo_id)
    if api is None:
        from huggingface_hub import HfApi
        from timm import __version__ as timm_version
        api = HfApi(library_name='timm', library_version=timm_version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_checkpoint(checkpoint_path, tmp, repo_id, license, use_ema, card_notes=card_notes)
        return upload_folder(api, folder, repo_id, private, commit_message, revision)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m hfhub.publish', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='train.py checkpoint (output/EXP/last.pth)')
    parser.add_argument('--repo-id', required=True, help='ORG/NAME, e.g. ORG/resnet18.gpd_fmnist')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--dry-run', metavar='DIR', default=None, help='write the folder to DIR, upload nothing')
    parser.add_argument('--overwrite', action='store_true',
                        help=f'with --dry-run: replace {", ".join(PUBLISHED_FILES)} if DIR already has them')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--card-notes', metavar='FILE', default=None,
                        help="markdown added to the model card after its results (e.g. a study's comparison)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='use_ema', action='store_true',
                     help='publish the EMA weights (default: EMA when the checkpoint has them)')
    ema.add_argument('--no-ema', dest='use_ema', action='store_false', help='publish the live weights')
    parser.set_defaults(use_ema=None)
    parser.add_argument('--revision', default=None, help='branch to upload to')
    parser.add_argument('--commit-message', default='Add timm-gpd student')
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    parser = _parser()
    args = parser.parse_args(argv)
    if args.overwrite and args.dry_run is None:
        parser.error('--overwrite only applies to --dry-run DIR')
    try:
        notes = None
        if args.card_notes is not None:
            try:
                notes = Path(args.card_notes).read_text(encoding='utf-8')
            except (OSError, UnicodeDecodeError) as e:
                raise PublishError(f'--card-notes {args.card_notes}: cannot read it ({type(e).__name__}: {e})') from e
        result = publish(
            args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run, license=args.license,
            use_ema=args.use_ema, commit_message=args.commit_message, revision=args.revision,
            overwrite=args.overwrite, card_notes=notes)
    except (CheckpointError, PublishError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 2
    if args.dry_run is not None:
        print(f'Dry run: wrote {", ".join(sorted(PUBLISHED_FILES))} to {result}; nothing uploaded.')
    else:
        print(f'Uploaded to https://huggingface.co/{args.repo_id}: {getattr(result, "commit_url", result)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
