"""Hugging Face cache layout without the network, and clear errors when a Hub model is not there.

`place_in_cache` lays a published folder out exactly as `huggingface_hub` would after a
download (blobs/, snapshots/<commit>/, refs/<revision>), so `timm.create_model('hf-hub:ORG/NAME',
pretrained=True)` with HF_HUB_OFFLINE=1 finds it. Tests use it; so can air-gapped machines
that receive published folders by other means.

    python -m hfhub.cache FOLDER --repo-id ORG/NAME [--cache-dir DIR] [--revision main]
"""
import argparse
import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.file_download import repo_folder_name

__all__ = ['HubModelNotFound', 'hub_cache_dir', 'cache_repo_dir', 'place_in_cache', 'explain_hub_errors',
           'explain_model_errors', 'create_model']

PathLike = Union[str, Path]


class HubModelNotFound(FileNotFoundError):
    """A Hub model (or one of its files) is neither reachable nor in the local cache."""


def hub_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    # read at call time: huggingface_hub resolves HF_HOME / HF_HUB_CACHE once, at its import
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def cache_repo_dir(repo_id: str, cache_dir: Optional[PathLike] = None) -> Path:
    return hub_cache_dir(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type='model')


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _link_or_copy(blob: Path, pointer: Path) -> None:
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        # relative, like huggingface_hub, so a moved cache keeps working
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        shutil.copy2(blob, pointer)


def place_in_cache(
        folder: PathLike,
        repo_id: str,
        cache_dir: Optional[PathLike] = None,
        revision: str = 'main',
) -> Path:
    """Copy every file of `folder` into the Hub cache as one commit of `repo_id`; return the snapshot dir.

    Blobs are named by content hash and the commit id by the hash of the file list, so placing the
    same folder twice gives the same snapshot.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    if not files:
        raise FileNotFoundError(f'Nothing to place in the cache: {folder} has no files.')
    repo_dir = cache_repo_dir(repo_id, cache_dir)
    listing = hashlib.sha1()
    blobs = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        sha = _sha256(path)
        listing.update(f'{rel}\0{sha}\n'.encode())
        blob = repo_dir / 'blobs' / sha
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, blob)
        blobs.append((rel, blob))
    commit = listing.hexdigest()
    snapshot = repo_dir / 'snapshots' / commit
    for rel, blob in blobs:
        _link_or_copy(blob, snapshot / rel)
    ref = repo_dir / 'refs' / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no newline: huggingface_hub reads the ref verbatim
    return snapshot


def _fix_hint(repo_id: str, cache_dir: Path) -> str:
    return (
        f'To fix: download it while online (`hf download {repo_id}`, then HF_HUB_OFFLINE=1 works), '
        f'place a published folder in the cache (`python -m hfhub.cache FOLDER --repo-id {repo_id}'
        f'{"" if cache_dir == hub_cache_dir() else f" --cache-dir {cache_dir}"}`), '
        f'or load the folder directly with timm.create_model("local-dir:FOLDER", pretrained=True).')


@contextlib.contextmanager
def explain_hub_errors(repo_id: str, cache_dir: Optional[PathLike] = None) -> Iterator[None]:
    """Re-raise Hub lookup failures for `repo_id` as HubModelNotFound naming the repo, the cache and a fix."""
    try:
        yield
    except (EntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError) as e:
        cache = hub_cache_dir(cache_dir)
        offline = constants.HF_HUB_OFFLINE
        where = (f'offline (HF_HUB_OFFLINE=1) and not in the local cache {cache_repo_dir(repo_id, cache)}'
                 if offline else f'not found on the Hub nor in the local cache {cache_repo_dir(repo_id, cache)}')
        raise HubModelNotFound(
            f'Hugging Face model {repo_id!r} (or a file of it) is {where}: {type(e).__name__}. '
            f'{_fix_hint(repo_id, cache)}') from e


@contextlib.contextmanager
def explain_model_errors(model_name: str, cache_dir: Optional[PathLike] = None) -> Iterator[None]:
    """explain_hub_errors for an 'hf-hub:ORG/NAME[@REV]' model name; other names pass through."""
    from timm.models import parse_model_name
    source, name = parse_model_name(model_name)
    if source != 'hf-hub':
        yield
        return
    with explain_hub_errors(name.split('@')[0], cache_dir):
        yield


def create_model(model_name: str, cache_dir: Optional[PathLike] = None, **kwargs):
    """`timm.create_model` whose 'hf-hub:' failures say which repo is missing and how to get it."""
    import timm
    with explain_model_errors(model_name, cache_dir):
        return timm.create_model(model_name, cache_dir=cache_dir, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Place a published model folder in the Hugging Face cache.')
    parser.add_argument('folder', help='folder written by `python -m hfhub.publish --dry-run FOLDER`')
    parser.add_argument('--repo-id', required=True, help='ORG/NAME it will be loaded as (hf-hub:ORG/NAME)')
    parser.add_argument('--cache-dir', default=None, help='hub cache (default: HF_HUB_CACHE or HF_HOME/hub)')
    parser.add_argument('--revision', default='main')
    args = parser.parse_args(argv)
    snapshot = place_in_cache(args.folder, args.repo_id, args.cache_dir, args.revision)
    print(f'Placed {args.folder} as {args.repo_id}@{args.revision}: {snapshot}')


if __name__ == '__main__':
    main()
