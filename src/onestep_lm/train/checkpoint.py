"""Atomic, verifiable checkpoints: nothing a run made is lost to a kill, a full disk or a damaged file.

A checkpoint is a folder `checkpoints/step_00001234/` holding
    model.safetensors   the model's weights
    state.pt            optimizer, schedule position, RNG states, counters (everything --resume needs)
    ema.safetensors     the EMA of the weights (only when train.ema is set)
    meta.json           step, and the size and sha256 of each file above
It is written into a temporary folder, every file fsync'ed, then renamed into place in one step, so a reader
sees either the whole checkpoint or none of it. On load, sizes and hashes are checked; a damaged or partial
checkpoint is skipped with a warning that names it, and the newest valid one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import RunError

FILES = ("model.safetensors", "state.pt")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                    keep_last: int = 3, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint atomically, then delete all but the newest `keep_last`. `extra` holds more weight
    files by name (e.g. {"ema.safetensors": ...}); they are hashed and verified like the others."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_interrupted(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    for name, tensors in (extra or {}).items():
        if not name.endswith(".safetensors") or name in FILES or "/" in name:
            raise ValueError(f"bad extra checkpoint file name {name!r}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
    torch.save(state, tmp / "state.pt")
    names = (*FILES, *sorted(extra or {}))
    meta = {"step": step, "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                                    for name in names}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    for name in (*names, "meta.json"):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # the same step written again (e.g. the end of a resumed run): replace it whole
        old = root / f".old_step_{step:08d}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(root)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        # renamed first, so a kill during the deletion never leaves a half-deleted `step_N` behind
        trash = root / f".del_{stale.name}_{os.getpid()}"
        os.replace(stale, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def _clean_interrupted(root: Path) -> None:
    """Tidy what a killed writer left: put back a checkpoint that was being replaced (`.old_step_N_pid` when
    `step_N` is missing), and remove temporary folders. Only the main process writes checkpoints."""
    for old in sorted(root.glob(".old_step_*")):
        final = root / "_".join(old.name[len(".old_"):].split("_")[:2])
        if not final.exists():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in [*root.glob(".tmp_step_*"), *root.glob(".del_step_*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders of an interrupted write are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        if not isinstance(files, dict) or any(name not in files for name in FILES):
            raise KeyError("files")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is missing or unreadable ({e.__class__.__name__})"
    for name in files:
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != files[name]["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, expected {files[name]['bytes']}"
        if _sha256(p) != files[name]["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped with a warning naming them."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping damaged checkpoint {path}: {problem}", stacklevel=2)
    return None


def load_weights(path: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The weights of a checkpoint (`name`: model.safetensors, or ema.safetensors for the EMA weights)."""
    return load_file(str(Path(path) / name))


def has_file(path: Path, name: str) -> bool:
    """Whether the checkpoint holds (and its meta.json lists) the file `name`."""
    try:
        return name in json.loads((Path(path) / "meta.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """A hash of a model's weights (names, dtypes, shapes and values), to tell one set of weights from another."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def require_checkpoint(run_dir: Path) -> Path:
    """The newest valid checkpoint of a run, or a clear error."""
    path = latest_checkpoint(run_dir)
    if path is None:
        found = len(list_checkpoints(run_dir))
        raise RunError(f"no valid checkpoint in {checkpoint_dir(run_dir)}"
                       + (f" ({found} found, all damaged)" if found else ""))
    return path
