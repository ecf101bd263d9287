"""Whether a planned train step fits a device, and which change to the params makes it fit when it does not.

The plan itself (what a step keeps, term by term) is :mod:`memory_plan`; this module turns it into the verdicts
`qlora plan` prints and prepare's preflight raises (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qlora_pipeline.stages.contract.memory_plan import (
    MemoryPlan,
    ModelShape,
    TrainShape,
    optimizer_state_bytes,
    plan_train,
    targeted,
    train_shape,
)

ALLOCATOR_HEADROOM = 0.10
"""Share of a GPU's memory the caching allocator's fragmentation may take (an assumption, not a measurement)."""
CUDA_CONTEXT_BYTES = 512 * 2**20
"""CUDA context and kernels' workspace, outside torch's allocations (an assumption, not a measurement)."""


def usable_bytes(capacity: int) -> int:
    """The bytes of a device of `capacity` that tensors can count on."""
    return int(capacity * (1 - ALLOCATOR_HEADROOM)) - CUDA_CONTEXT_BYTES


def fitting_changes(shape: ModelShape, t: TrainShape, capacity: int) -> list[tuple[str, MemoryPlan]]:
    """Changes to the params that make a step fit `capacity`, each with its plan: single changes, least intrusive
    first; when none fits alone, the shortest run of them, in that order, that fits together."""
    usable = usable_bytes(capacity)
    state = sum(
        optimizer_state_bytes(t.lora_r * (out + in_), t.state_bits) * shape.layers
        for out, in_ in targeted(shape, t.targets).values()
    )
    tries: list[tuple[str, dict[str, Any]]] = []
    if t.weight_cache_bytes and plan_train(shape, t).weight_cache:
        tries.append(("train.frozen_weight_cache_mb: 0", {"weight_cache_bytes": 0}))
    if not t.checkpointing or t.recompute_budget_tokens:
        every_layer = {"checkpointing": True, "recompute_budget_tokens": 0}
        tries.append(("train.gradient_checkpointing: true, checkpoint_min_tokens: 0", every_layer))
    if t.state_bits == 32:
        tries.append(("train.optimizer: paged_adamw_8bit", {"state_bits": 8}))
    if t.adapter_bytes == 4:
        tries.append(("train.adapter_dtype: bfloat16", {"adapter_bytes": 2}))
    if t.page_budget_bytes is None and state > 256 * 2**20:
        tries.append(("train.optimizer_page_budget_mb: 256", {"page_budget_bytes": 256 * 2**20}))
    batch = t.batch_size
    while batch > 1:
        batch //= 2
        label = f"train.batch_size: {batch} with grad_accum x{t.batch_size // batch} (the same effective batch)"
        tries.append((label, {"batch_size": batch, "checkpointing": True}))
    length = t.max_length
    while length > 256:
        length //= 2
        tries.append((f"data.max_length: {length} (longer examples are cut)", {"max_length": length}))
    more_gpus = [  # the most intrusive: more hardware; every rank needs an example of each batch
        (f"train.nproc: {g} with train.distributed: fsdp ({g} such GPUs)", {"ranks": g, "sharded": True})
        for g in (2, 4, 8)
        if g > t.ranks and t.batch_size >= g
    ]
    found = []
    for label, fields in tries + more_gpus:
        plan = plan_train(shape, replace(t, **fields))
        if plan.device_peak <= usable:
            found.append((label, plan))
    if found:
        return found
    for base_label, base in [("", {}), *more_gpus]:  # the shortest run of changes, on these GPUs or more
        applied, labels = dict(base), [base_label] if base_label else []
        for label, fields in tries:
            if fields.get("batch_size", t.batch_size) < applied.get("ranks", t.ranks):
                continue
            applied |= fields
            labels = [*[x for x in labels if x.split(":")[0] != label.split(":")[0]], label]
            plan = plan_train(shape, replace(t, **applied))
            if plan.device_peak <= usable:
                return [(" and ".join(labels), plan)]
    return []


AUTO_RECOMPUTE_SHARE = 0.8
"""train.checkpoint_min_tokens: auto on a GPU plans a step within this share of the usable memory: the plan is held
to 10 % of measured peaks on a CPU (tests/unit/test_memory_plan.py), and a GPU adds workspaces the plan does not
count."""


def recompute_tokens_that_fit(shape: ModelShape, t: TrainShape, capacity: int) -> int:
    """The recompute budget auto takes on a GPU of `capacity` free bytes: the largest from `t`'s own (the floor)
    up to its longest batch (``t.tokens``: then no batch recomputes) whose planned step peak stays within
    AUTO_RECOMPUTE_SHARE of the usable memory; the floor when even that does not fit. A larger budget recomputes
    fewer layers and keeps more, so the peak grows with it and the search halves the range."""
    limit = AUTO_RECOMPUTE_SHARE * usable_bytes(capacity)

    def fits(tokens: int) -> bool:
        return plan_train(shape, replace(t, recompute_budget_tokens=tokens)).device_peak <= limit

    low, high = t.recompute_budget_tokens, t.tokens
    if not t.checkpointing or high <= low or not fits(low):
        return low
    if fits(high):
        return high
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def gib(n: int) -> float:
    return n / 2**30


def check_train_memory(
    params: Any, config: dict[str, Any], capacity: int, where: str, ranks: int | None = None
) -> MemoryPlan:
    """The plan of a train step on each of `ranks` devices of `capacity` bytes; InputError in one line, with the
    least intrusive change that fits, when it does not fit."""
    from qlora_pipeline.stages.contract.errors import InputError

    shape, t = ModelShape.from_config(config), train_shape(params, config, ranks=ranks)
    plan = plan_train(shape, t)
    if plan.device_peak <= usable_bytes(capacity):
        return plan
    changes = fitting_changes(shape, t, capacity)
    fix = f"set {changes[0][0]}" if changes else "no single setting fits: use a GPU with more memory"
    raise InputError(
        f"a train step needs about {gib(plan.device_peak):.1f} GiB but {where} has {gib(capacity):.1f} GiB "
        f"({gib(usable_bytes(capacity)):.1f} usable); {fix} (see `qlora plan`)"
    )
