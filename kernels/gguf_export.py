"""Write a Hugging Face Llama/Qwen2 folder as a GGUF file that llama.cpp (and transformers) load.

Why not llama.cpp's converter: the `gguf` wheel does not ship `convert_hf_to_gguf.py`, and K-quants need the C
`llama-quantize`. So this module does both jobs with `gguf.GGUFWriter`, copying the converter's conventions
(docs/formats.md, GGUF):

* tensor names `token_embd`, `output_norm`, `output`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,
  ffn_gate,ffn_up,ffn_down}` (`.weight`, plus `.bias` for Qwen2's q/k/v);
* Llama's Q and K rows are permuted, because HF Llama applies rotary embeddings "rotate-half" style while llama.cpp's
  LLAMA arch uses rope type NORM on adjacent pairs. Qwen2 runs NEOX rope in llama.cpp, the same layout as HF, so it is
  not permuted. Getting this wrong still loads, but generates garbage;
* `output.weight` is not written when the embeddings are tied; llama.cpp then reuses `token_embd`;
* 1-D tensors (norms, biases) stay F32;
* tokenizer: GPT-2-style byte-level BPE keys, with `tokenizer.ggml.pre` set explicitly, since an unknown pre-tokenizer
  silently changes how llama.cpp splits text.

Quantized types mirror what llama.cpp itself produces:

* F16 / F32: casts (what `convert_hf_to_gguf.py --outtype f16` writes);
* Q8_0: every 2-D weight Q8_0 through `gguf.quants` (bit-exact with ggml's reference);
* Q4_0: 2-D weights Q4_0 through `gguf.quants`, except the output head (or tied token embedding), which
  `llama-quantize` always lifts to Q6_K (Q8_0 when its rows are not a multiple of 256);
* Q4_K_M: the llama.cpp mix from `kernels.kquants.q4_k_m_type_for` with our Q4_K/Q6_K quantizers, and Q5_0/Q8_0 for
  row lengths that are not a multiple of 256 (e.g. SmolLM2's 576).
A tensor that no block type fits (row length not a multiple of 32) is written F16, as llama.cpp does; every such
substitution is listed in the returned stats.

The file is written to a temporary name in the destination folder and renamed at the end, so an error never leaves a
partial GGUF behind. Tensors are streamed (header and tensor table first, then one tensor at a time), so peak memory
is about one tensor, not the whole model.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize as gguf_quantize

from kernels import kquants
from kernels.kquants import Fallback

QT = GGMLQuantizationType

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M")
_FILE_TYPE = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
}
GGML_QUANT_VERSION = 2
_FP16_MAX = 65504.0

__all__ = ["QTYPES", "SUPPORTED_ARCHITECTURES", "permute_qk", "write_gguf"]


# --------------------------------------------------------------------------------------------------------------------
# Config and tensors
# --------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} not found; the model folder needs it for GGUF export") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the model with save_pretrained") from None


@dataclass(frozen=True)
class _Hparams:
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


def _hparams(cfg: dict[str, Any]) -> _Hparams:
    archs = cfg.get("architectures") or [cfg.get("model_type", "<none>")]
    name = archs[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {name} for GGUF export; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    arch = SUPPORTED_ARCHITECTURES[name]
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
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    linear = None
    if rope_type == "linear":
        linear = float(rope["factor"])
    elif rope_type != "default":
        # llama3/yarn/longrope need extra keys or a rope_freqs tensor; writing the file without them would load
        # fine in llama.cpp and then produce wrong attention at long range.
        raise ValueError(f"rope scaling type {rope_type!r} is not supported by the GGUF writer (default, linear only)")
    head_dim = cfg.get("head_dim")
    return _Hparams(
        arch=arch,
        hidden=hidden,
        n_head=n_head,
        head_dim=int(head_dim) if head_dim else hidden // n_head,
        rope_theta=theta,
        rope_linear_factor=linear,
        tied=bool(cfg.get("tie_word_embeddings", False)),  # transformers' default for both classes
        explicit_head_dim=bool(head_dim),
        **hp,
    )


class _TensorSource:
    """Lazy access to the safetensors of a folder (single file or sharded with an index), as float32 numpy."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():  # sharded checkpoint: exactly the shards the index names
            files = sorted({model_dir / f for f in _read_json(index).get("weight_map", {}).values()})
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
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_REQUIRED_LAYER = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
_QWEN2_REQUIRED_BIASES = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class _Item:
    hf: str
    name: str
    shape: tuple[int, ...]  # numpy (torch) order: (rows, cols)
    permute_heads: int | None
    layer: int


def _expected_shapes(hp: _Hparams) -> dict[str, tuple[int, ...]]:
    q, kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    return {
        "input_layernorm.weight": (hp.hidden,),
        "post_attention_layernorm.weight": (hp.hidden,),
        "self_attn.q_proj.weight": (q, hp.hidden),
        "self_attn.k_proj.weight": (kv, hp.hidden),
        "self_attn.v_proj.weight": (kv, hp.hidden),
        "self_attn.o_proj.weight": (hp.hidden, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (hp.hidden,),
        "mlp.gate_proj.weight": (hp.ffn, hp.hidden),
        "mlp.up_proj.weight": (hp.ffn, hp.hidden),
        "mlp.down_proj.weight": (hp.hidden, hp.ffn),
    }


def _plan_tensors(src: _TensorSource, hp: _Hparams, model_dir: Path) -> list[_Item]:
    """Map every HF tensor to its GGUF name, refusing missing, misshapen or unknown tensors up front."""
    have = src.names()
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    if not hp.tied:
        required.append("lm_head.weight")
    layer_req = _REQUIRED_LAYER + (_QWEN2_REQUIRED_BIASES if hp.arch == "qwen2" else [])
    required += [f"model.layers.{i}.{k}" for i in range(hp.n_layers) for k in layer_req]
    for name in required:
        if name not in have:
            raise ValueError(
                f"model folder {model_dir} is missing tensor {name} (needed for {hp.arch} GGUF export); "
                "re-save the model with save_pretrained"
            )

    expected = _expected_shapes(hp)
    top = {
        "model.embed_tokens.weight": ("token_embd.weight", (hp.vocab, hp.hidden)),
        "model.norm.weight": ("output_norm.weight", (hp.hidden,)),
        "lm_head.weight": ("output.weight", (hp.vocab, hp.hidden)),
    }
    items: list[_Item] = []
    for key in sorted(have, key=_sort_key):
        if key.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by every runtime; the converter drops it too
        if key == "lm_head.weight" and hp.tied:
            continue  # tied: llama.cpp reuses token_embd
        shape = src.shape(key)
        m = _LAYER_KEY.match(key)
        if key in top:
            gname, want = top[key]
            layer, permute = -1, None
        elif m and m.group(2) in _LAYER_MAP and int(m.group(1)) < hp.n_layers:
            layer, sub = int(m.group(1)), m.group(2)
            gname, want = f"blk.{layer}.{_LAYER_MAP[sub]}", expected[sub]
            permute = None
            if hp.arch == "llama" and sub.startswith("self_attn.q_proj"):
                permute = hp.n_head
            elif hp.arch == "llama" and sub.startswith("self_attn.k_proj"):
                permute = hp.n_head_kv
        else:
            raise ValueError(
                f"unexpected tensor {key} in {model_dir}; the {hp.arch} GGUF writer does not know where it goes"
            )
        if shape != want:
            raise ValueError(f"tensor {key} has shape {list(shape)}, expected {list(want)} from config.json")
        items.append(_Item(key, gname, shape, permute, layer))
    return items


def _sort_key(key: str) -> tuple[int, int, str]:
    m = _LAYER_KEY.match(key)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (0 if "embed_tokens" in key else 2, 0, key)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _token_content(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


def _contains_type(node: Any, typ: str) -> list[dict[str, Any]]:
    """All nodes of a tokenizer.json component tree (Sequence nesting) with the given "type"."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == typ else []
    for key in ("pretokenizers", "decoders", "processors", "normalizers"):
        for child in node.get(key) or []:
            found += _contains_type(child, typ)
    return found


_SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>"]


def _detect_pre(
    arch: str, tok: dict[str, Any], tok_cfg: dict[str, Any], cfg: dict[str, Any], model_dir: Path, tokens: list[str]
) -> str:
    """Pick llama.cpp's pre-tokenizer name (the regex it splits text with before BPE).

    Order: SmolLM2 signals (a model/tokenizer name containing "smollm", or its 49152-token vocab starting with its
    special tokens) -> "smollm"; a Qwen2-style or Llama-3-style Split regex in tokenizer.json -> "qwen2"/"llama-bpe";
    a plain byte-level pre-tokenizer -> "gpt-2" (llama.cpp's spelling; "gpt2" is not recognised and would silently
    fall back to its default regex); otherwise the architecture's default ("qwen2" for qwen2, "gpt-2" otherwise).
    """
    names = [cfg.get("_name_or_path"), cfg.get("_model_name_or_path"), tok_cfg.get("name_or_path"), model_dir.name]
    src = model_dir / "source.json"
    if src.is_file():
        names.append(src.read_text(encoding="utf-8", errors="replace"))
    if any(isinstance(n, str) and "smollm" in n.lower() for n in names):
        return "smollm"
    if len(tokens) == 49152 and tokens[:4] == _SMOLLM_SPECIALS:
        return "smollm"
    pre = tok.get("pre_tokenizer")
    for split in _contains_type(pre, "Split"):
        pattern = split.get("pattern", {})
        regex = pattern.get("Regex") or pattern.get("String") or ""
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in regex:
            return "qwen2"
    byte_level = _contains_type(pre, "ByteLevel")
    plain = len(_contains_type(pre, "Split")) == 0 and len(_contains_type(pre, "Digits")) == 0
    if byte_level and byte_level[0].get("use_regex", True) and plain:
        return "gpt-2"
    return "qwen2" if arch == "qwen2" else "gpt-2"


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def _read_tokenizer(model_dir: Path, cfg: dict[str, Any], hp: _Hparams, pre_override: str | None) -> _Vocab:
    tok = _read_json(model_dir / "tokenizer.json")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"tokenizer.json model type {model.get('type')!r} is not supported; GGUF export writes byte-level BPE only"
        )
    if model.get("byte_fallback"):
        raise ValueError("SentencePiece-style BPE (byte_fallback) tokenizers are not supported by the GGUF writer yet")
    if not _contains_type(tok.get("pre_tokenizer"), "ByteLevel") and not _contains_type(
        tok.get("decoder"), "ByteLevel"
    ):
        raise ValueError("tokenizer.json is not byte-level BPE (no ByteLevel pre-tokenizer/decoder); not supported")

    id_to_tok: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    for i, t in added.items():
        if id_to_tok.get(i, t["content"]) != t["content"]:
            raise ValueError(f"tokenizer maps both {id_to_tok[i]!r} and {t['content']!r} to id {i}")
        id_to_tok[i] = t["content"]
    n = hp.vocab
    if id_to_tok and max(id_to_tok) >= n:
        raise ValueError(f"tokenizer has token id {max(id_to_tok)} but the embedding has only {n} rows")
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n)]  # rows past the tokenizer: filled as the converter
    types = [int(TokenType.NORMAL if i in id_to_tok else TokenType.UNUSED) for i in range(n)]
    for i, t in added.items():
        types[i] = int(TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    dupes = [t for t, c in Counter(tokens).items() if c > 1]
    if dupes:
        # llama.cpp aborts (GGML_ASSERT id_to_token.size() == token_to_id.size()) on duplicate token strings.
        raise ValueError(f"tokenizer has duplicate token strings (e.g. {dupes[0]!r}); llama.cpp cannot load that")
    vocab = {t: i for i, t in enumerate(tokens)}

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_cfg.get(f"{key}_token"))
        if content is not None and content in vocab:
            special[key] = vocab[content]
            continue
        cid = cfg.get(f"{key}_token_id")
        if isinstance(cid, list):
            cid = cid[0] if cid else None
        if isinstance(cid, int) and 0 <= cid < n:
            special[key] = cid

    add_bos, add_eos = tok_cfg.get("add_bos_token"), tok_cfg.get("add_eos_token")
    post = tok.get("post_processor") or {}
    tp = _contains_type(post, "TemplateProcessing")
    single = tp[0].get("single", []) if tp else []
    if add_bos is None:
        add_bos = bool(single) and "SpecialToken" in single[0]
    if add_eos is None:
        add_eos = bool(single) and "SpecialToken" in single[-1]

    chat = tok_cfg.get("chat_template")
    jinja = model_dir / "chat_template.jinja"
    if chat is None and jinja.is_file():
        chat = jinja.read_text(encoding="utf-8")
    pre = pre_override or _detect_pre(hp.arch, tok, tok_cfg, cfg, model_dir, tokens)
    return _Vocab(tokens, types, merges, pre, special, bool(add_bos), bool(add_eos), chat)


# --------------------------------------------------------------------------------------------------------------------
# Type selection and quantization
# --------------------------------------------------------------------------------------------------------------------


def _choose_type(qtype: str, item: _Item, hp: _Hparams, fallbacks: list[Fallback]) -> QT:
    if len(item.shape) == 1 or item.name.endswith("_norm.weight"):
        return QT.F32
    cols = item.shape[1]
    if qtype == "F32":
        return QT.F32
    if qtype == "F16":
        return QT.F16
    if qtype == "Q4_K_M":
        return kquants.q4_k_m_type_for(
            item.name, item.layer, hp.n_layers, cols, tied_embeddings=hp.tied, fallbacks=fallbacks
        )
    wanted = QT.Q8_0 if qtype == "Q8_0" else QT.Q4_0
    if qtype == "Q4_0" and (item.name == "output.weight" or (hp.tied and item.name == "token_embd.weight")):
        # llama-quantize's output-tensor rule: the LM head is never 4-bit; Q6_K, or Q8_0 if rows are not 256-aligned.
        wanted = QT.Q6_K
        if cols % kquants.QK_K != 0:
            used = QT.Q8_0 if cols % 32 == 0 else QT.F16
            fallbacks.append(Fallback(item.name, "Q6_K", used.name, f"ncols {cols} not divisible by 256"))
            return used
        return wanted
    if cols % 32 != 0:
        fallbacks.append(Fallback(item.name, wanted.name, "F16", f"ncols {cols} not divisible by 32"))
        return QT.F16
    return wanted


def _encode(w: np.ndarray, t: QT, name: str) -> np.ndarray:
    if t == QT.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if t == QT.F16:
        if np.abs(w).max(initial=0.0) > _FP16_MAX:
            raise ValueError(f"tensor {name} has values beyond the fp16 range (|x| > 65504); export F32 or Q8_0")
        return w.astype(np.float16)
    if t == QT.Q4_K:
        return kquants.quantize_q4_k(w)
    if t == QT.Q6_K:
        return kquants.quantize_q6_k(w)
    return gguf_quantize(np.ascontiguousarray(w, dtype=np.float32), t)


def _nbytes_and_shape(shape: tuple[int, ...], t: QT) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape passed to add_tensor_info, its numpy dtype, byte size) for a tensor of logical shape `shape`."""
    if t in (QT.F32, QT.F16):
        dt = np.dtype(np.float32 if t == QT.F32 else np.float16)
        return shape, dt, int(np.prod(shape)) * dt.itemsize
    block, size = GGML_QUANT_SIZES[t]
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def write_gguf(
    model_dir: Path,
    out_path: Path,
    qtype: str,
    metadata: dict[str, str] | None = None,
    *,
    progress: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Export the HF folder `model_dir` (config.json, *.safetensors, tokenizer.json) to `out_path` as GGUF.

    qtype is one of "F16", "Q8_0", "Q4_0", "Q4_K_M" ("F32" too, mainly to feed llama.cpp's own quantizer in tests).
    metadata adds string keys (lineage: e.g. "general.source.repo_url", "general.uuid", "qlora.dataset_sha256",
    "qlora.git_commit"); "general.name" overrides the default name and "tokenizer.ggml.pre" overrides the detected
    pre-tokenizer. Keys the writer owns (architecture, hyperparameters, tokenizer, file type) are refused.
    progress(tensor_name, type_name) is called before each tensor is encoded.

    Returns stats: {"path", "qtype", "arch", "file_size", "seconds", "n_tensors", "tensor_types": {type: count},
    "fallbacks": [{"tensor", "wanted", "used", "reason"}], "tokenizer_pre", "tied_embeddings"}.
    Raises ValueError (one line, naming the problem) for an unsupported architecture, missing/misshapen/unknown
    tensors, an unsupported tokenizer, or bad metadata; no file is left at out_path (nor a temp file) on any error.
    """
    t0 = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if qtype not in QTYPES:
        raise ValueError(f"unknown GGUF qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError(f"metadata must map non-empty string keys to strings; got {k!r}: {type(v).__name__}")
    if not model_dir.is_dir():
        raise ValueError(f"model folder {model_dir} does not exist")
    cfg = _read_json(model_dir / "config.json")
    hp = _hparams(cfg)
    vocab = _read_tokenizer(model_dir, cfg, hp, metadata.pop("tokenizer.ggml.pre", None))

    with ExitStack() as stack:
        src = _TensorSource(model_dir, stack)
        items = _plan_tensors(src, hp, model_dir)
        fallbacks: list[Fallback] = []
        types = [_choose_type(qtype, it, hp, fallbacks) for it in items]

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.parent / f".{out_path.name}.{os.getpid()}.tmp"
        writer: GGUFWriter | None = None
        try:
            writer = GGUFWriter(tmp, hp.arch)
            _write_kv(writer, hp, vocab, qtype, metadata, model_dir)
            for it, t in zip(items, types, strict=True):
                shape, dt, nbytes = _nbytes_and_shape(it.shape, t)
                writer.add_tensor_info(it.name, shape, dt, nbytes, raw_dtype=None if dt != np.uint8 else t)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for data in _encoded(items, types, src, progress):
                writer.write_tensor_data(data)
            writer.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
            raise

    return {
        "path": str(out_path),
        "qtype": qtype,
        "arch": hp.arch,
        "file_size": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 3),
        "n_tensors": len(items),
        "tensor_types": dict(sorted(Counter(t.name for t in types).items())),
        "fallbacks": [f.to_dict() for f in fallbacks],
        "tokenizer_pre": vocab.pre,
        "tied_embeddings": hp.tied,
    }


def _encoded(
    items: list[_Item], types: list[QT], src: _TensorSource, progress: Callable[[str, str], None] | None
) -> Iterator[np.ndarray]:
    for it, t in zip(items, types, strict=True):
        if progress is not None:
            progress(it.name, t.name)
        w = src.get(it.hf)
        if it.permute_heads is not None:
            w = permute_qk(w, it.permute_heads)
        if not np.isfinite(w).all():
            raise ValueError(f"tensor {it.hf} contains NaN or Inf; refusing to export a broken model")
        yield _encode(w, t, it.hf)


def _write_kv(
    w: GGUFWriter, hp: _Hparams, vocab: _Vocab, qtype: str, metadata: dict[str, str], model_dir: Path
) -> None:
    w.add_type("model")
    w.add_name(metadata.pop("general.name", model_dir.name))
    w.add_block_count(hp.n_layers)
    w.add_context_length(hp.ctx)
    w.add_embedding_length(hp.hidden)
    w.add_feed_forward_length(hp.ffn)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.arch == "llama":
        w.add_rope_dimension_count(hp.head_dim)
        w.add_vocab_size(hp.vocab)
    if hp.explicit_head_dim:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if hp.rope_linear_factor is not None:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_linear_factor)
    w.add_file_type(int(_FILE_TYPE[qtype]))
    w.add_quantization_version(GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    adders["pad"] = w.add_pad_token_id
    for key, tid in vocab.special.items():
        adders[key](tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    w.add_add_space_prefix(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)

    for key, value in metadata.items():
        if key in w.kv_data[0] or key.startswith(("tokenizer.", f"{hp.arch}.")) or key == "general.architecture":
            raise ValueError(f"metadata key {key!r} is reserved: the GGUF writer sets it from the model")
        w.add_string(key, value)
