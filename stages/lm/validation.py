"""Periodic validation during training: the best adapter so far, and when to stop.

Every `train.eval_every` steps the validation split's loss is measured; the adapter with the lowest one is kept (a
CPU copy) and becomes the trained adapter at the end; with `train.early_stopping_patience` training stops after
that many evaluations without improvement. The state travels in every checkpoint (the best adapter as its own
safetensors file), so a resumed run keeps the same best and the same patience count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class ValidationState:
    best_step: int | None = None
    best_loss: float = math.inf
    evals_since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_adapter: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def record(self, step: int, loss: float, adapter: dict[str, torch.Tensor]) -> bool:
        """Log one evaluation; keep `adapter` (copied to the CPU) if it is the best so far. True when it is."""
        self.history.append({"step": step, "val_loss": loss})
        if loss < self.best_loss:
            self.best_step, self.best_loss, self.evals_since_best = step, loss, 0
            self.best_adapter = {k: v.detach().to("cpu", copy=True) for k, v in adapter.items()}
            return True
        self.evals_since_best += 1
        return False

    def should_stop(self, patience: int | None) -> bool:
        return patience is not None and self.evals_since_best >= patience

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("best_adapter")
        out["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, best_adapter: dict[str, torch.Tensor] | None) -> ValidationState:
        if not data:
            return cls()
        loss = data.get("best_loss")
        return cls(
            best_step=data.get("best_step"),
            best_loss=math.inf if loss is None else float(loss),
            evals_since_best=int(data.get("evals_since_best", 0)),
            history=list(data.get("history", [])),
            best_adapter=best_adapter,
        )


__all__ = ["ValidationState"]
