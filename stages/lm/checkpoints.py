"""Training checkpoints that survive a killed run: adapter, optimizer (incl. 8-bit and paged state),
RNG, data position and loss history, written atomically, loaded without unpickling code.

They live outside the stage's temporary output (which a crash deletes), under a directory keyed by the
run's inputs, so only a compatible run resumes from them.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qlora_pipeline.kernels.formats.atomic import atomic_dir
from qlora_pipeline.stages.contract.artifacts import sha256_file

KEEP = 2
BEST_ADAPTER = "best_adapter.safetensors"


@dataclass
class TrainState:
    step: int
    losses: list[float]
    extra: dict[str, Any]
    best_adapter: dict[str, torch.Tensor] | None = None


def _step_dirs(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_checkpoint(
    root: Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    losses: list[float],
    extra: dict[str, Any],
    best_adapter: dict[str, torch.Tensor] | None = None,
) -> Path:
    final = step_dir(root, step)
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        if best_adapter is not None:  # periodic validation's best so far (stages/lm/validation.py)
            save_file({k: v.contiguous() for k, v in best_adapter.items()}, str(tmp / BEST_ADAPTER))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state(), "cuda": _cuda_rng()}, tmp / "rng.pt")
        state = {
            "step": step,
            "losses": losses,
            "python_random": _py_rng_to_json(random.getstate()),
            "extra": extra,
        }
        (tmp / "state.json").write_text(json.dumps(state))
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "checksums.json").write_text(json.dumps(sums))
    for old in _step_dirs(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint's files (missing, truncated or edited against its checksums), or None."""
    try:
        sums = json.loads((path / "checksums.json").read_text())
        for name, digest in sums.items():
            if sha256_file(path / name) != digest:
                return f"{name} does not match its checksum"
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc.__class__.__name__}: {exc})"
    return None


def usable_checkpoints(root: Path) -> tuple[list[Path], list[str]]:
    """Checkpoints whose files verify, newest first, and a line for each damaged one skipped on the way (a power
    loss or a kill can leave the newest one torn; two are kept so the one before it is still there)."""
    usable, skipped = [], []
    for path in reversed(_step_dirs(root)):
        problem = damage(path)
        if problem is None:
            usable.append(path)
        else:
            skipped.append(f"{path.name}: {problem}")
    return usable, skipped


def latest_checkpoint(root: Path) -> Path | None:
    dirs = _step_dirs(root)
    return dirs[-1] if dirs else None


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], TrainState]:
    """Restore optimizer and RNG in place; return the adapter tensors and the loop state.

    A checkpoint whose files differ from its checksums is refused (a torn or edited copy).
    """
    sums = json.loads((path / "checksums.json").read_text())
    for name, digest in sums.items():
        if sha256_file(path / name) != digest:
            raise ValueError(
                f"checkpoint file {path / name} does not match its checksum; delete {path} to resume "
                "from the previous checkpoint"
            )
    adapter = load_file(str(path / "adapter.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    random.setstate(_py_rng_from_json(state["python_random"]))
    best = load_file(str(path / BEST_ADAPTER)) if (path / BEST_ADAPTER).is_file() else None
    return adapter, TrainState(step=state["step"], losses=state["losses"], extra=state["extra"], best_adapter=best)


def _cuda_rng() -> list[torch.Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _py_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
