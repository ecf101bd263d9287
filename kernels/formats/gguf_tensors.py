"""The tensor side of a GGUF export: the model's hyperparameters, which HF tensor becomes which GGUF tensor, and
Llama's Q/K row permutation (docs/formats.md, GGUF). Pure planning: nothing here writes a file."""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlora_pipeline.kernels.architectures import Family, family_of_class, unsupported_architecture


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} not found; the model folder needs it for GGUF export") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the model with save_pretrained") from None


@dataclass(frozen=True)
class Hparams:
    family: Family
    config: dict[str, Any]
    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab: int
    ctx: int
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    tied: bool
    explicit_head_dim: bool
    rope_freq_factors: tuple[float, ...] | None = None
    """Llama 3.x (`rope_type: llama3`): a divisor per rotary frequency, written as the `rope_freqs.weight` tensor."""
    rope_theta_swa: float | None = None
    """Gemma 3: the rope base of the sliding-window layers (the global ones take `rope_theta`)."""
    swa_layers: tuple[bool, ...] | None = None
    """Which layers attend within `sliding_window` (from `layer_types`), None when the config names no types."""


def read_hparams(cfg: dict[str, Any]) -> Hparams:
    archs = cfg.get("architectures") or [cfg.get("model_type", "<none>")]
    name = archs[0]
    family = family_of_class(name)
    if family is None:
        raise ValueError(unsupported_architecture(name, "for GGUF export"))
    arch = family.gguf_arch
    try:
        hidden = int(cfg["hidden_size"])
        n_head = int(cfg["num_attention_heads"])
        hp = dict(
            n_layers=int(cfg["num_hidden_layers"]),
            ffn=int(cfg["intermediate_size"]),
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            vocab=int(cfg["vocab_size"]),
            ctx=int(cfg.get("max_position_embeddings", 2048)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise ValueError(f"config.json lacks {e.args[0]!r}, which GGUF export needs") from None
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta_swa = None
    if "full_attention" in rope:  # Gemma 3: one rope per attention type; llama.cpp scales only the global one
        local = rope.get("sliding_attention") or {}
        if str(local.get("rope_type", "default")) != "default":
            raise ValueError(f"sliding-layer rope type {local.get('rope_type')!r} is not supported by the GGUF writer")
        theta_swa = float(local.get("rope_theta", 10000.0))
        rope = rope["full_attention"]
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    head_dim = cfg.get("head_dim")
    linear, factors = None, None
    if rope_type == "linear":
        linear = float(rope["factor"])
    elif rope_type == "llama3" and family.llama3_rope:
        factors = llama3_rope_factors(rope, theta, int(head_dim) if head_dim else hidden // n_head)
    elif rope_type != "default":
        # yarn/longrope need extra keys; writing the file without them would load fine in llama.cpp and then
        # produce wrong attention at long range.
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported by the GGUF writer (default, linear, llama3 for Llama)"
        )
    head_dim_value = int(head_dim) if head_dim else hidden // n_head
    check_query_scale(cfg, family, hp["n_layers"], hidden // n_head, head_dim_value)
    types = cfg.get("layer_types")
    return Hparams(
        family=family,
        config=cfg,
        arch=arch,
        hidden=hidden,
        n_head=n_head,
        head_dim=head_dim_value,
        rope_theta=theta,
        rope_linear_factor=linear,
        tied=bool(cfg.get("tie_word_embeddings", False)),  # transformers' default for both classes
        explicit_head_dim=bool(head_dim),
        rope_freq_factors=factors,
        rope_theta_swa=theta_swa,
        swa_layers=tuple(t == "sliding_attention" for t in types) if types and cfg.get("sliding_window") else None,
        **hp,
    )


def check_query_scale(cfg: dict[str, Any], family: Family, n_layers: int, wide: int, head_dim: int) -> None:
    """Gemma's query scale is `query_pre_attn_scalar ** -0.5`; llama.cpp has no key for it and uses head_dim (the
    27B: hidden / heads), so a model with another scalar would load and attend wrongly: refused."""
    scalar = cfg.get("query_pre_attn_scalar")
    if not family.gguf_query_scale_27b_layers or scalar is None:
        return
    used = wide if n_layers == family.gguf_query_scale_27b_layers else head_dim
    if int(scalar) != used:
        raise ValueError(
            f"query_pre_attn_scalar is {scalar} but llama.cpp scales a {n_layers}-layer {family.gguf_arch} model's "
            f"queries by 1/sqrt({used}); the GGUF file would attend differently from the model"
        )


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> tuple[float, ...]:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp takes it: one divisor per rotary frequency
    (docs/formats.md, GGUF). High frequencies (wavelength under original context / high_freq_factor) keep 1, low
    ones (over original context / low_freq_factor) get `factor`, the band between is interpolated smoothly; the
    same rule as transformers' `llama3` rope, which multiplies the inverse frequencies by the reciprocals."""
    try:
        factor = float(rope["factor"])
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        context = float(rope.get("original_max_position_embeddings", 8192))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"llama3 rope scaling needs a numeric 'factor' in config.json, got {rope}") from None
    out = []
    # fp32 frequencies, as both transformers and llama.cpp's converter compute them
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    for freq in inv_freq.astype(np.float32).tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            out.append(1.0)
        elif wavelength > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            out.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return tuple(out)


class TensorSource:
    """Lazy access to the safetensors of a folder (single file or sharded with an index), as float32 numpy."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():  # sharded checkpoint: exactly the shards the index names, each checked to be in it
            from qlora_pipeline.kernels.formats.hf_folder import weight_files

            files = [model_dir / f for f in weight_files(model_dir)]
        elif (model_dir / "model.safetensors").is_file():  # ignore stray files such as adapter_model.safetensors
            files = [model_dir / "model.safetensors"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors in {model_dir}; GGUF export reads safetensors only")
        self._where: dict[str, Any] = {}
        for f in files:
            try:
                h = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:
                raise ValueError(f"{f} is not a readable safetensors file ({e}); re-save the model") from None
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                self._where[k] = h

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name).float().numpy()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's rotate-half layout to llama.cpp's adjacent-pair (NORM rope) layout.

    Within each head, HF pairs dimension i with i + head_dim/2; llama.cpp pairs 2i with 2i+1. Interleaving the two
    halves of each head turns one into the other. Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # gate rows then up rows, as llama.cpp's phi3 splits it
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class PlannedTensor:
    hf: str
    name: str
    shape: tuple[int, ...]  # numpy (torch) order: (rows, cols)
    permute_heads: int | None
    layer: int
    computed: np.ndarray | None = None
    """Data the writer makes itself (Llama 3's `rope_freqs.weight`) instead of reading `hf` from the folder."""
    offset: float = 0.0
    """Added to the values on export (Gemma's (1 + w) norms become llama.cpp's w)."""


def _expected_shapes(hp: Hparams, cfg_shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {f"{name}.weight": shape for name, shape in cfg_shapes.items()}
    shapes.update(
        {
            "input_layernorm.weight": (hp.hidden,),
            "post_attention_layernorm.weight": (hp.hidden,),
            "pre_feedforward_layernorm.weight": (hp.hidden,),
            "post_feedforward_layernorm.weight": (hp.hidden,),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.bias": (hp.hidden,),
            "self_attn.q_norm.weight": (hp.head_dim,),
            "self_attn.k_norm.weight": (hp.head_dim,),
        }
    )
    return shapes


def plan_tensors(src: TensorSource, hp: Hparams, model_dir: Path) -> list[PlannedTensor]:
    """Map every HF tensor to its GGUF name, refusing missing, misshapen or unknown tensors up front."""
    have = src.names()
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hp.tied:
        required.append("lm_head.weight")
    linears = [f"{name}.weight" for group in hp.family.linear_sets for name in group]
    layer_req = _NORMS + linears + list(hp.family.layer_extras)
    required += [f"model.layers.{i}.{k}" for i in range(hp.n_layers) for k in layer_req]
    for name in required:
        if name not in have:
            raise ValueError(
                f"model folder {model_dir} is missing tensor {name} (needed for {hp.arch} GGUF export); "
                "re-save the model with save_pretrained"
            )

    expected = _expected_shapes(hp, hp.family.linear_shapes(hp.config))
    top = {
        "model.embed_tokens.weight": ("token_embd.weight", (hp.vocab, hp.hidden)),
        "model.norm.weight": ("output_norm.weight", (hp.hidden,)),
        "lm_head.weight": ("output.weight", (hp.vocab, hp.hidden)),
    }
    items: list[PlannedTensor] = []
    if hp.rope_freq_factors is not None:  # first, where llama.cpp's converter puts it
        factors = np.asarray(hp.rope_freq_factors, dtype=np.float32)
        items.append(PlannedTensor("<llama3 rope scaling>", "rope_freqs.weight", factors.shape, None, -1, factors))
    for key in sorted(have, key=_sort_key):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime; the converter drops it too
        if key == "lm_head.weight" and hp.tied:
            continue  # tied: llama.cpp reuses token_embd
        shape = src.shape(key)
        in_layer = layer_tensor(hp, key)
        if key in top:
            gname, want = top[key]
            layer, permute = -1, None
        elif in_layer is not None:
            gname, permute = in_layer
            m = _LAYER_KEY.match(key)
            assert m is not None
            layer, want = int(m.group(1)), expected[m.group(2)]
        else:
            raise ValueError(
                f"unexpected tensor {key} in {model_dir}; the {hp.arch} GGUF writer does not know where it goes"
            )
        if shape != want:
            raise ValueError(f"tensor {key} has shape {list(shape)}, expected {list(want)} from config.json")
        offset = 1.0 if hp.family.norm_offset and key.endswith("norm.weight") else 0.0
        items.append(PlannedTensor(key, gname, shape, permute, layer, offset=offset))
    return items


def layer_tensor(hp: Hparams, key: str) -> tuple[str, int | None] | None:
    """The GGUF name of a decoder-layer HF tensor (``model.layers.3.self_attn.q_proj.weight`` → ``blk.3.attn_q.weight``)
    and the head count its rows are permuted with (None: not permuted), or None when the writer does not place it."""
    m = _LAYER_KEY.match(key)
    layer_map = {**_LAYER_MAP, **dict(hp.family.gguf_layer_names)}
    if not m or m.group(2) not in layer_map or int(m.group(1)) >= hp.n_layers:
        return None
    sub = m.group(2)
    permute = None
    if hp.family.gguf_permute_qk and sub.startswith("self_attn.q_proj"):
        permute = hp.n_head
    elif hp.family.gguf_permute_qk and sub.startswith("self_attn.k_proj"):
        permute = hp.n_head_kv
    return f"blk.{m.group(1)}.{layer_map[sub]}", permute


def _sort_key(key: str) -> tuple[int, int, str]:
    m = _LAYER_KEY.match(key)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed_tokens" in key else 2, 0, key)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------
