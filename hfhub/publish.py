"""Publish the student of a train.py checkpoint to the Hugging Face Hub as a stock timm model.

    python -m hfhub.publish --checkpoint output/EXP/last.pth --repo-id ORG/resnet18.gpd_fmnist \\
        [--private] [--dry-run DIR]

Writes model.safetensors + config.json (timm.models.save_for_hf) and a model card README.md, then
uploads the folder (HfApi.create_repo + upload_folder; token from HF_TOKEN or `hf auth login`).
--dry-run DIR only writes the folder.
"""
import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .card import read_run, render_card
from .checkpoint import build_model, extract_student, load_checkpoint
from .export import data_config_from_args, label_names_for, save_student

__all__ = ['export_checkpoint', 'upload_folder', 'publish', 'main']

_logger = logging.getLogger(__name__)


def _tag(repo_id: str) -> str:
    # timm names weights ARCH.TAG; the tag is what follows the arch in the repo name
    name = repo_id.split('/')[-1]
    return name.split('.', 1)[1] if '.' in name else name


def _student_info(student, data_config: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        params_m=round(sum(p.numel() for p in student.parameters()) / 1e6, 3),
        input_size=tuple(data_config['input_size']),
    )


def export_checkpoint(
        checkpoint_path: Union[str, Path],
        out_dir: Union[str, Path],
        repo_id: str,
        license: str = 'apache-2.0',
        use_ema: Optional[bool] = None,
) -> Path:
    """Write the checkpoint's extracted student and its model card to `out_dir`.

    use_ema=None takes the EMA weights when the checkpoint has them, as train.py does for its
    student.safetensors.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if use_ema is None:
        use_ema = checkpoint.get('state_dict_ema') is not None
    model = build_model(checkpoint, use_ema=use_ema, source=str(checkpoint_path))
    student = extract_student(model)
    run = read_run(Path(checkpoint_path), checkpoint, ema=use_ema)
    data_config = data_config_from_args(student, dict(run.args, img_size=checkpoint.get('img_size')))
    out_dir = save_student(
        student, out_dir, data_config, tag=_tag(repo_id), license=license,
        label_names=label_names_for(run.checkpoint.parent, run.dataset, checkpoint['num_classes']))
    card = render_card(run, repo_id, license, _student_info(student, data_config))
    (out_dir / 'README.md').write_text(card, encoding='utf-8')
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
):
    """Export, then upload unless `dry_run` (the folder to keep) is given. Returns the folder or the commit."""
    if dry_run is not None:
        return export_checkpoint(checkpoint_path, dry_run, repo_id, license, use_ema)
    if api is None:
        from huggingface_hub import HfApi
        from timm import __version__ as timm_version
        api = HfApi(library_name='timm', library_version=timm_version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_checkpoint(checkpoint_path, tmp, repo_id, license, use_ema)
        return upload_folder(api, folder, repo_id, private, commit_message, revision)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m hfhub.publish', description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', required=True, help='train.py checkpoint (output/EXP/last.pth)')
    parser.add_argument('--repo-id', required=True, help='ORG/NAME, e.g. ORG/resnet18.gpd_fmnist')
    parser.add_argument('--private', action='store_true', help='create the repo as private')
    parser.add_argument('--dry-run', metavar='DIR', default=None, help='write the folder to DIR, upload nothing')
    parser.add_argument('--license', default='apache-2.0')
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument('--ema', dest='use_ema', action='store_true',
                     help='publish the EMA weights (default: EMA when the checkpoint has them)')
    ema.add_argument('--no-ema', dest='use_ema', action='store_false', help='publish the live weights')
    parser.set_defaults(use_ema=None)
    parser.add_argument('--revision', default=None, help='branch to upload to')
    parser.add_argument('--commit-message', default='Add timm-gpd student')
    return parser


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    args = _parser().parse_args(argv)
    result = publish(
        args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run, license=args.license,
        use_ema=args.use_ema, commit_message=args.commit_message, revision=args.revision)
    if args.dry_run is not None:
        files = ', '.join(sorted(p.name for p in Path(result).iterdir()))
        print(f'Dry run: wrote {files} to {result}; nothing uploaded.')
    else:
        print(f'Uploaded to https://huggingface.co/{args.repo_id}: {getattr(result, "commit_url", result)}')


if __name__ == '__main__':
    main()
