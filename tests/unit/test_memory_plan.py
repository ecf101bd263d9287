"""The memory planner against what a train step really holds, and the checks and command built on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_pipeline.pipelines.cli import app
from qlora_pipeline.stages.contract import preflight
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.memory_fit import check_train_memory, fitting_changes, usable_bytes
from qlora_pipeline.stages.contract.memory_plan import ModelShape, plan_train, train_shape
from qlora_pipeline.stages.contract.params import parse_params
from tests import tiny
from tests.memory_probe import PROBES, measure

GIB = 2**30
LLAMA_65B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "intermediate_size": 22016,
    "vocab_size": 32000,
}


@pytest.mark.parametrize("index", [0, 3, 6, 8, 9], ids=lambda i: PROBES[i].label)
def test_the_plan_is_within_ten_percent_of_the_measured_peak(index: int) -> None:
    """Live torch tensor bytes at the step's peak (every op's outputs counted, on the CPU) vs the planner's sum:
    Llama with and without checkpointing, Qwen3's q/k norms, Mistral with 8-bit state, Gemma 2's eager attention."""
    peak, plan = measure(PROBES[index])
    assert abs(plan.device_peak - peak) / peak < 0.10, (plan.as_dict(), peak)


def test_nf4_base_is_the_papers_arithmetic() -> None:
    """4 bits a weight plus 0.127 bit of double-quantized scales (8/64 + 32/(64*256)), for every decoder linear."""
    shape = ModelShape.from_config(LLAMA_65B)
    weights = shape.layers * sum(o * i for o, i in shape.linears.values())
    plan = plan_train(shape, train_shape(parse_params({}), LLAMA_65B))
    assert plan.base_nf4 / weights * 8 == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), rel=1e-3)


def test_a_step_that_does_not_fit_is_refused_in_one_line_naming_a_change_that_fits() -> None:
    params = parse_params({"train": {"lora_r": 64, "batch_size": 1}, "data": {"max_length": 512}})
    shape, t = ModelShape.from_config(LLAMA_65B), train_shape(params, LLAMA_65B)
    assert plan_train(shape, t).device_peak > usable_bytes(48 * 10**9)
    with pytest.raises(InputError) as err:
        check_train_memory(params, LLAMA_65B, 48 * 10**9, "cuda:0")
    msg = str(err.value)
    assert "\n" not in msg and "set train." in msg
    assert re.match(r"a train step needs about \d+\.\d GiB but cuda:0 has 44\.7 GiB \(39\.7 usable\)", msg), msg
    changes = fitting_changes(shape, t, 48 * 10**9)
    assert changes and all(p.device_peak <= usable_bytes(48 * 10**9) for _, p in changes)
    assert check_train_memory(params, LLAMA_65B, 80 * 10**9, "cuda:0").device_peak < 80 * 10**9


def test_prepare_checks_the_gpu_before_any_work(monkeypatch, tmp_path: Path) -> None:
    """On a GPU node prepare plans the train step against the device's memory (a 0.5 GiB GPU, less than the CUDA
    context alone, then 8 GiB)."""
    import torch

    model = tiny.make_model_dir(tmp_path / "m", "llama")
    params = parse_params({"model": {"source": "local", "path": str(model)}})

    class Props:
        total_memory = 540 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    with pytest.raises(InputError, match=r"a train step needs about .* but cuda:0 has 0\.5 GiB"):
        preflight.check_gpu_memory(params, "cuda:0")
    Props.total_memory = 8 * GIB
    preflight.check_gpu_memory(params, "cuda:0")


def test_plan_command_says_fits_or_what_to_change(tmp_path: Path) -> None:
    model = tiny.make_model_dir(tmp_path / "m", "llama")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"model": {"source": "local", "path": str(model)}}))
    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "-p", str(params), "--gpu-memory", "8"])
    assert ok.exit_code == 0 and "fits:" in ok.output, ok.output
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_65B))
    big = runner.invoke(app, ["plan", "-p", str(params), "--gpu-memory", "40", "--model-config", str(config)])
    assert big.exit_code == 1 and "does not fit" in big.output and "fits with train." in big.output, big.output
    bad = runner.invoke(app, ["plan", "-p", str(params), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "not a number of GiB" in bad.output


def test_fsdp_divides_the_layers_and_adapter_state_among_the_ranks() -> None:
    """Per rank under FSDP2 with 2 GPUs: half the NF4 layers, adapter and optimizer state, plus two whole layers
    gathered; the same 16-bit embeddings and head; half the examples. ddp: only the examples are divided."""
    one = parse_params(
        {"train": {"lora_r": 64, "batch_size": 2, "optimizer": "adamw_32bit", "checkpoint_min_tokens": 0}}
    )
    shape = ModelShape.from_config(LLAMA_65B)
    single = plan_train(shape, train_shape(one, LLAMA_65B))
    sharded = plan_train(shape, train_shape(one, LLAMA_65B, ranks=2))
    replicated = plan_train(
        shape,
        train_shape(parse_params({"train": {**one.train.model_dump(), "distributed": "ddp"}}), LLAMA_65B, ranks=2),
    )
    layer = single.base_nf4 / shape.layers
    assert sharded.base_nf4 == pytest.approx(single.base_nf4 / 2, rel=1e-6)
    assert sharded.gathered == pytest.approx(2 * (layer + single.lora / shape.layers), rel=1e-3)
    assert (sharded.lora, sharded.optimizer) == (single.lora // 2, single.optimizer // 2)
    assert sharded.base_16bit == replicated.base_16bit == single.base_16bit
    assert replicated.base_nf4 == single.base_nf4 and replicated.optimizer == single.optimizer
    assert replicated.activations < single.activations and replicated.gathered == 0


def test_a_model_no_single_gpu_holds_is_told_how_many_gpus_would() -> None:
    """Llama 3 70B on 24 GB GPUs: no setting fits one. With the defaults FSDP2 over 8 does: over 4, a rank's 2
    examples of up to 256 tokens are within the 512-token recompute budget, so no layer recomputes and its
    activations alone outgrow the GPU; with every layer recomputed (checkpoint_min_tokens: 0), 4 do."""
    llama3_70b = {**LLAMA_65B, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}
    shape = ModelShape.from_config(llama3_70b)
    for min_tokens, gpus in ((512, 8), (0, 4)):
        t = train_shape(parse_params({"train": {"checkpoint_min_tokens": min_tokens}}), llama3_70b)
        changes = fitting_changes(shape, t, 24 * 10**9)
        assert changes[0][0].startswith(f"train.nproc: {gpus} with train.distributed: fsdp"), changes[0][0]
        assert changes[0][1].device_peak <= usable_bytes(24 * 10**9) < plan_train(shape, t).device_peak


def test_plan_command_reports_each_stages_host_memory_and_refuses_a_host_too_small(tmp_path: Path) -> None:
    """A 65B config: evaluate and export load its 16-bit weights (130 GB) on the host; 64 GiB of RAM is refused."""
    model = tiny.make_model_dir(tmp_path / "m", "llama")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"model": {"source": "local", "path": str(model)}}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_65B))
    runner = CliRunner()
    args = ["plan", "-p", str(params), "--gpu-memory", "80", "--model-config", str(config), "--host-memory", "64"]
    out = runner.invoke(app, args)
    assert out.exit_code == 1 and "host memory per stage" in out.output, out.output
    assert "does not fit the host: evaluate, export" in out.output, out.output
    peaks = dict(re.findall(r"(\w+) (\d+\.\d)", out.output.split("RAM):")[1].splitlines()[1]))
    assert float(peaks["evaluate"]) == pytest.approx(2 * 65.3e9 / 2**30 + 0.5, rel=0.02)
    assert float(peaks["quantize"]) < 12 and float(peaks["merge"]) < 12, "one shard at a time, not the model"
    assert runner.invoke(app, [*args[:-1], "256"]).exit_code == 0


def test_the_plan_counts_the_sizes_the_kernels_use() -> None:
    from qlora_pipeline.kernels import attention, fused_ce
    from qlora_pipeline.kernels.optim import adamw_math
    from qlora_pipeline.stages.contract import memory_plan

    assert memory_plan.LOSS_CHUNK == fused_ce.DEFAULT_CHUNK
    assert memory_plan.BYTES_PER_LOGIT == fused_ce.BYTES_PER_LOGIT
    assert memory_plan.SHORT_ATTENTION_KEYS == attention.SHORT_KEYS
    assert memory_plan.SHORT_ATTENTION_BACKWARD_BYTES == attention.BACKWARD_BYTES_PER_SCORE
    assert memory_plan.SHORT_ATTENTION_QUERY_TILE == attention.QUERY_TILE
    assert memory_plan.OPTIMIZER_RUN_ELEMENTS == adamw_math.BATCH_ELEMENTS
    assert memory_plan.UPDATE_BYTES_PER_ELEMENT == adamw_math.UPDATE_BYTES_PER_ELEMENT
