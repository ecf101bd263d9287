"""The PEFT on-disk LoRA adapter format, written and read without importing peft.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (peft strips the adapter name on save).
Serving tools (peft, vLLM, llama.cpp's convert_lora_to_gguf) read exactly this, so it is the adapter we ship.
The config carries the LoRA fields peft 0.21 writes for a plain LoRA; fields we leave out take peft's defaults
on load, and peft ignores (with a warning) fields it does not know, so older/newer peft versions still read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qlora_pipeline.kernels.lora import LoraLinear, is_targeted, load_lora_state_dict, lora_modules, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(rf"^{re.escape(KEY_PREFIX)}(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class LoraAdapterConfig:
    """The LoRA settings an adapter folder declares (what inject_lora needs to rebuild matching layers)."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | str
    use_rslora: bool
    base_model_name_or_path: str | None

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def peft_key(module_name: str, which: str) -> str:
    """``model.layers.0.self_attn.q_proj``, ``lora_A`` -> the key peft saves for it."""
    return f"{KEY_PREFIX}{module_name}.{which}.weight"


def _json_number(x: float) -> int | float:
    """peft writes lora_alpha as given (usually an int); keep integral values ints for a familiar config."""
    return int(x) if float(x).is_integer() else float(x)


def _check_model_matches(model: nn.Module, r: int, alpha: float, use_rslora: bool) -> dict[str, LoraLinear]:
    layers = lora_modules(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call inject_lora before saving an adapter")
    want = lora_scaling(r, alpha, use_rslora)
    for name, m in layers.items():
        if m.r != r or abs(m.scaling - want) > 1e-12 * max(1.0, abs(want)):
            raise ValueError(
                f"LoRA layer {name} has r={m.r}, scaling={m.scaling:g} but the config to save says r={r}, "
                f"scaling={want:g} (alpha={alpha}, use_rslora={use_rslora}); save with the settings used to inject"
            )
    return layers


def save_peft_adapter(
    model: nn.Module,
    out_dir: Path,
    base_model_name_or_path: str,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads.

    Tensors keep the adapter dtype (fp32 by default, as peft saves its upcast adapters). The caller owns atomicity
    (stages write into a temporary directory and rename it), so this writes straight into ``out_dir``.
    """
    layers = _check_model_matches(model, r, alpha, use_rslora)
    pairs = {name: (m.lora_A.detach(), m.lora_B.detach()) for name, m in layers.items()}
    write_peft_adapter(pairs, out_dir, base_model_name_or_path, target_modules, r, alpha, dropout, use_rslora)


def write_peft_adapter(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    out_dir: Path,
    base_model_name_or_path: str,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
) -> None:
    """The adapter folder from ``{module name: (lora_A (r, in), lora_B (out, r))}``: what
    :func:`save_peft_adapter` writes for a model, and what quantize writes for a LoftQ initialisation (no model)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, (lora_a, lora_b) in pairs.items():
        if lora_a.shape[0] != r or lora_b.shape[1] != r:
            raise ValueError(f"LoRA pair {name} has rank {lora_a.shape[0]}/{lora_b.shape[1]}, the config says r={r}")
        tensors[peft_key(name, "lora_A")] = lora_a.to("cpu").contiguous()
        tensors[peft_key(name, "lora_B")] = lora_b.to("cpu").contiguous()
    # peft and transformers expect the "format": "pt" metadata on safetensors files written from torch.
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(r),
        "lora_alpha": _json_number(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(set(target_modules)),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "auto_mapping": None,
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_adapter_config(adapter_dir: Path) -> LoraAdapterConfig:
    """Parse and vet ``adapter_config.json``: a plain LoRA that our layers can represent, or a one-line error."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"missing {CONFIG_NAME} in {adapter_dir}; a PEFT adapter folder needs {CONFIG_NAME} + {WEIGHTS_NAME}"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-save the adapter") from None
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in raw:
            raise ValueError(f"{path}: missing field {field!r}; found {', '.join(sorted(raw))}")
    unsupported = {
        "use_dora": bool(raw.get("use_dora")),
        "rank_pattern": bool(raw.get("rank_pattern")),
        "alpha_pattern": bool(raw.get("alpha_pattern")),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "modules_to_save": bool(raw.get("modules_to_save")),
        "lora_bias": bool(raw.get("lora_bias")),
        "bias": raw.get("bias", "none") != "none",
    }
    bad = [k for k, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options {bad} (only plain LoRA/rsLoRA on linear layers)")
    targets = raw["target_modules"]
    return LoraAdapterConfig(
        r=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
        use_rslora=bool(raw.get("use_rslora", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


def read_adapter_tensors(adapter_dir: Path, config: LoraAdapterConfig) -> dict[str, torch.Tensor]:
    """Read the weights and check them against the config; return them keyed like ``lora_state_dict``."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        hint = (
            " (adapter_model.bin is never unpickled; re-save with safetensors)"
            if (adapter_dir / "adapter_model.bin").exists()
            else ""
        )
        raise ValueError(f"missing {WEIGHTS_NAME} in {adapter_dir}{hint}")
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            m = _KEY_RE.match(key)
            if m is None:
                raise ValueError(f"{path}: unexpected key {key!r}; expected {KEY_PREFIX}<module>.lora_A/B.weight")
            module, which = m["module"], m["which"]
            t = f.get_tensor(key)
            rank = t.shape[0] if which == "lora_A" else t.shape[-1]
            if t.dim() != 2 or rank != config.r:
                raise ValueError(
                    f"{CONFIG_NAME} says r={config.r} but {key} in {WEIGHTS_NAME} has shape "
                    f"{tuple(t.shape)} (rank {rank}); config and weights come from different adapters"
                )
            if not is_targeted(module, config.target_modules):
                raise ValueError(
                    f"{WEIGHTS_NAME} has {key} but {module!r} is not in {CONFIG_NAME} target_modules "
                    f"{config.target_modules}; config and weights come from different adapters"
                )
            out[f"{module}.{which}"] = t
    if not out:
        raise ValueError(f"{path} holds no LoRA tensors")
    return out


def lora_weight_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{<module>.weight: (A, B)}``, the base weight each LoRA pair updates, from adapter tensors keyed as
    :func:`read_adapter_tensors` returns them (``<module>.lora_A``) or as the file stores them (PEFT keys).

    A module with only one of A and B is left out.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, which = key.removeprefix(KEY_PREFIX).removesuffix(".weight").rpartition(".")
        pairs.setdefault(f"{module}.weight", {})[which] = value
    return {k: (v["lora_A"], v["lora_B"]) for k, v in pairs.items() if "lora_A" in v and "lora_B" in v}


def load_peft_adapter(model_with_lora: nn.Module, adapter_dir: Path) -> None:
    """Load a PEFT LoRA adapter (ours or peft's) into a model already passed through ``inject_lora``.

    The model's LoRA scaling must equal the adapter's (inject with ``read_adapter_config``'s r/alpha/use_rslora):
    silently adopting another scaling would change outputs. Nothing is copied unless every check passes.
    """
    config = read_adapter_config(adapter_dir)
    state = read_adapter_tensors(adapter_dir, config)
    for name, m in lora_modules(model_with_lora).items():
        if f"{name}.lora_A" in state and abs(m.scaling - config.scaling) > 1e-12 * max(1.0, abs(config.scaling)):
            raise ValueError(
                f"adapter scaling {config.scaling:g} (r={config.r}, lora_alpha={config.alpha:g}, "
                f"use_rslora={config.use_rslora}) differs from LoRA layer {name}'s {m.scaling:g}; "
                f"inject_lora with the adapter's settings"
            )
    load_lora_state_dict(model_with_lora, state, display_key=_peft_key_of)


def _peft_key_of(key: str) -> str:
    """``<module>.lora_A`` (our state-dict key) -> the PEFT key as written in the file."""
    module, which = key.rsplit(".", 1)
    return peft_key(module, which)
