"""Training on N processes (`train.nproc`): data-parallel or FSDP2-sharded, on torch.distributed (docs/multi_gpu.md).

Every rank computes the same BatchPlan and takes every N-th example of each micro-batch, so the ranks together see
exactly the examples one process would, and each rank's loss is divided by the step's target tokens over all ranks:
the summed gradients equal the single-process gradients.

- `ddp`: every rank holds the whole model; after a step's micro-batches the adapter gradients are summed across
  ranks in one flat all-reduce (DDP's algorithm; DDP's module wrapper is not used because the loss calls the
  decoder and the frozen head separately, so the wrapper's forward is never the one that runs).
- `fsdp`: `fully_shard` (FSDP2) on every decoder layer, with the NF4 codes and absmax stored as frozen parameters
  so FSDP shards them with the LoRA weights; each rank keeps 1/N of every layer and gathers a layer around its
  forward and backward. Embeddings, the final norm and the head stay whole on every rank (they are used outside
  the decoder's forward by the chunked loss).

A rank's optimizer state is the state of its own shard (fsdp) or of the whole adapter (ddp); checkpoints are
written per rank, and a resumed run restarts every rank at the newest step all of them saved.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qlora_pipeline.kernels.optim.adamw import local_shard
from qlora_pipeline.stages.lm.batching import Batch, BatchPlan


@dataclass(frozen=True)
class World:
    """This process's place among the training processes torchrun started."""

    rank: int
    size: int
    local_rank: int
    mode: str

    @classmethod
    def from_env(cls, mode: str) -> World | None:
        """The world torchrun describes in the environment, or None for a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return None
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")), mode)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, resolved: torch.device) -> torch.device:
        """Rank r computes on GPU r of its node; CPU ranks share the CPU."""
        return torch.device(resolved.type, self.local_rank) if resolved.type == "cuda" else resolved

    def start(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = value.clone()
        dist.all_reduce(out)
        return out

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (on the backend's device: NCCL reduces only GPU tensors)."""
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def backward_scale(world: World | None) -> int:
    """FSDP averages the gradients it reduce-scatters (a divide factor of 1 needs NCCL's PREMUL_SUM, which gloo
    lacks), so the loss a rank backpropagates is multiplied by N to make that average the sum."""
    return 1 if world is None or world.mode != "fsdp" else world.size


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    from qlora_pipeline.stages.lm.lm_loss import decoder_and_head

    decoder, _ = decoder_and_head(model)
    return decoder.layers


def shard_model(model: Any, world: World, device: torch.device) -> None:
    """fsdp: every decoder layer sharded across the ranks, NF4 storage included; ddp: nothing to do."""
    if world.mode != "fsdp":
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from qlora_pipeline.kernels.linear4bit import Linear4bit
    from qlora_pipeline.stages.lm.lm_loss import decoder_and_head

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.store_as_parameters()
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    decoder, head = decoder_and_head(model)
    whole = {p for m in (decoder.embed_tokens, decoder.norm, head) for p in m.parameters()}
    fully_shard(decoder, mesh=mesh, ignored_params=whole)


def gradient_sync(model: Any, world: World | None, last: bool) -> None:
    """fsdp: reduce-scatter the gradients only after a step's last micro-batch."""
    if world is not None and world.mode == "fsdp":
        from qlora_pipeline.stages.lm.lm_loss import decoder_and_head

        decoder_and_head(model)[0].set_requires_gradient_sync(last)


def sum_gradients(trainable: list[torch.nn.Parameter], world: World | None) -> None:
    """ddp: one flat all-reduce of every adapter gradient (fsdp reduce-scatters its own)."""
    if world is None or world.mode != "ddp":
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in trainable if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = _flatten_dense_tensors(group)
        dist.all_reduce(flat)
        for g, summed in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            g.copy_(summed)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def whole_parameters(model: Any) -> Iterator[None]:
    """Inside: every sharded layer gathered, so its modules hold plain full tensors (to save the adapter)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def parameter_bytes(model: Any, kind: type) -> int:
    """Bytes this rank holds of the parameters and buffers of every `kind` module (its shards under fsdp)."""
    total = 0
    for module in model.modules():
        if isinstance(module, kind):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                total += local_shard(t).numel() * t.element_size()
    return total


ERRORS_ENV = "QLORA_RANK_ERRORS"


def launch(stage: str, params: Any, nproc: int, parent_run_id: str | None) -> Any:
    """Run `stage` on `nproc` processes under torchrun on this node and return rank 0's manifest; a rank's one-line
    error is raised here as the same kind of error (InputError: exit 2)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from qlora_pipeline.stages.contract.artifacts import verify_artifact
    from qlora_pipeline.stages.contract.currency import artifacts_root
    from qlora_pipeline.stages.contract.errors import InputError, PipelineError

    with tempfile.TemporaryDirectory(prefix=f"{stage}-launch-") as tmp:
        spec = Path(tmp) / "params.json"
        spec.write_text(json.dumps(params.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", __name__, stage, str(spec), parent_run_id or ""]
        env = {**os.environ, ERRORS_ENV: tmp, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            found = sorted(Path(tmp).glob("rank*.json"))
            if found:
                err = json.loads(found[0].read_text())
                kind = InputError if err["input"] else PipelineError
                raise kind(f"{err['message']} (rank {err['rank']} of {nproc})")
            raise PipelineError(
                f"{stage} on {nproc} processes failed (torchrun exit {rc}) without a stage error: a rank was killed "
                "or crashed (see above); run it again to resume from the last checkpoint"
            )
    return verify_artifact(artifacts_root(params) / stage, stage)


def rank_main(argv: list[str]) -> int:
    """One torchrun rank: the stage's own `run`, its error written where the launcher reads it."""
    import importlib
    import json
    from pathlib import Path

    from qlora_pipeline.stages.contract.errors import InputError, PipelineError
    from qlora_pipeline.stages.contract.params import parse_params

    stage, spec, parent = argv
    params = parse_params(json.loads(Path(spec).read_text()), source="launcher params")
    module = importlib.import_module(f"qlora_pipeline.stages.{stage}")
    try:
        module.run(params, parent or None)
    except PipelineError as exc:
        rank = int(os.environ.get("RANK", "0"))
        report = {"rank": rank, "message": str(exc), "input": isinstance(exc, InputError)}
        if os.environ.get(ERRORS_ENV):
            Path(os.environ[ERRORS_ENV], f"rank{rank}.json").write_text(json.dumps(report))
        return 2 if isinstance(exc, InputError) else 1
    return 0


@dataclass
class StepBatches:
    """One step's micro-batches as this process trains them, and what the whole step holds over every rank."""

    batches: list[Batch]
    n_target: int
    tokens: int
    padded_tokens: int
    """Positions computed, padding included, over every rank."""


def next_step(
    plan: BatchPlan, stream: Any, rows: list, targets: list[int], pad_id: int, world: World | None, accum: int
) -> StepBatches:
    """The step's `accum` micro-batches, this process's share of each."""
    picked = [next(stream) for _ in range(accum)]
    examples = [i for batch in picked for row in batch for i in row]
    ranks = 1 if world is None else world.size
    shares = [[plan.share(b, r, ranks) for b in picked] for r in range(ranks)]  # every rank's, to count padding
    mine = shares[0 if world is None else world.rank]
    return StepBatches(
        batches=[plan.collate(b, rows, pad_id) for b in mine],
        n_target=sum(targets[i] for i in examples),
        tokens=sum(plan.lengths[i] for i in examples),
        padded_tokens=sum(plan.padded_tokens(b) for share in shares for b in share),
    )


if __name__ == "__main__":
    import sys

    sys.exit(rank_main(sys.argv[1:]))
