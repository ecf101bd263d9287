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
* Q4_K_M, Q5_K_M: the llama.cpp mixes from `qlora_pipeline.kernels.kquant_mix.k_m_type_for` with our Q4_K/Q5_K/Q6_K
  quantizers, and Q5_0/Q5_1/Q8_0 for row lengths that are not a multiple of 256 (e.g. SmolLM2's 576).
A tensor that no block type fits (row length not a multiple of 32) is written F16, as llama.cpp does; every such
substitution is listed in the returned stats.

The file is written to a temporary name in the destination folder and renamed at the end
(:func:`qlora_pipeline.kernels.formats.atomic.atomic_file`), so an error never leaves a partial GGUF behind. Tensors
are streamed (header and tensor table first, then one tensor at a time), so peak memory is about one tensor, not the
whole model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf.quants import quantize as gguf_quantize

from qlora_pipeline.kernels import kquants
from qlora_pipeline.kernels.formats.atomic import atomic_file
from qlora_pipeline.kernels.formats.gguf_tensors import (
    Hparams,
    PlannedTensor,
    TensorSource,
    permute_qk,
    plan_tensors,
    read_hparams,
    read_json,
)
from qlora_pipeline.kernels.formats.gguf_vocab import Vocab, read_tokenizer
from qlora_pipeline.kernels.kquant_mix import MIX_BASE, Fallback, k_m_type_for

QT = GGMLQuantizationType

QTYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M")
_FILE_TYPE = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
}
GGML_QUANT_VERSION = 2
_FP16_MAX = 65504.0

__all__ = ["QTYPES", "permute_qk", "write_gguf"]


# --------------------------------------------------------------------------------------------------------------------
# Config and tensors
# --------------------------------------------------------------------------------------------------------------------


def _choose_type(qtype: str, item: PlannedTensor, hp: Hparams, fallbacks: list[Fallback]) -> QT:
    if len(item.shape) == 1 or item.name.endswith("_norm.weight"):
        return QT.F32
    cols = item.shape[1]
    if qtype == "F32":
        return QT.F32
    if qtype == "F16":
        return QT.F16
    if qtype in MIX_BASE:
        return k_m_type_for(
            qtype, item.name, item.layer, hp.n_layers, cols, tied_embeddings=hp.tied, fallbacks=fallbacks
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
    if t == QT.Q5_K:
        return kquants.quantize_q5_k(w)
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

    qtype is one of "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_M" ("F32" too, mainly to feed llama.cpp's own quantizer in
    tests).
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
    cfg = read_json(model_dir / "config.json")
    hp = read_hparams(cfg)
    vocab = read_tokenizer(model_dir, cfg, hp, metadata.pop("tokenizer.ggml.pre", None))

    with ExitStack() as stack:
        src = TensorSource(model_dir, stack)
        items = plan_tensors(src, hp, model_dir)
        fallbacks: list[Fallback] = []
        types = [_choose_type(qtype, it, hp, fallbacks) for it in items]

        with atomic_file(out_path) as tmp:
            writer = GGUFWriter(tmp, hp.arch)
            try:
                _write_kv(writer, hp, vocab, qtype, metadata, model_dir)
                for it, t in zip(items, types, strict=True):
                    shape, dt, nbytes = _nbytes_and_shape(it.shape, t)
                    writer.add_tensor_info(it.name, shape, dt, nbytes, raw_dtype=None if dt != np.uint8 else t)
                writer.write_header_to_file(tmp)
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for data in _encoded(items, types, src, progress):
                    writer.write_tensor_data(data)
            finally:
                writer.close()

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
    items: list[PlannedTensor], types: list[QT], src: TensorSource, progress: Callable[[str, str], None] | None
) -> Iterator[np.ndarray]:
    for it, t in zip(items, types, strict=True):
        if progress is not None:
            progress(it.name, t.name)
        w = it.computed if it.computed is not None else src.get(it.hf)
        if it.permute_heads is not None:
            w = permute_qk(w, it.permute_heads)
        if it.offset:
            w = w + np.float32(it.offset)
        if not np.isfinite(w).all():
            raise ValueError(f"tensor {it.hf} contains NaN or Inf; refusing to export a broken model")
        yield _encode(w, t, it.hf)


def _write_kv(w: GGUFWriter, hp: Hparams, vocab: Vocab, qtype: str, metadata: dict[str, str], model_dir: Path) -> None:
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
    if hp.arch == "llama":  # keys llama.cpp's converter writes for the GGUF arch "llama" (Llama and Mistral)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_vocab_size(hp.vocab)
    if hp.arch == "gemma2":  # soft-capping and the sliding window of alternate layers, as the converter writes them
        w.add_attn_logit_softcapping(float(hp.config.get("attn_logit_softcapping") or 0.0))
        w.add_final_logit_softcapping(float(hp.config.get("final_logit_softcapping") or 0.0))
        w.add_sliding_window(int(hp.config.get("sliding_window") or 0))
        if not hp.explicit_head_dim:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
    if hp.arch == "gemma3":  # head dims, soft-capping only when set, and the sliding layers with their rope base
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        if hp.config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(hp.config["final_logit_softcapping"]))
        if hp.swa_layers is not None and any(hp.swa_layers):
            w.add_sliding_window(int(hp.config["sliding_window"]))
            w.add_sliding_window_pattern(list(hp.swa_layers))
            w.add_rope_freq_base_swa(hp.rope_theta_swa if hp.rope_theta_swa is not None else hp.rope_theta)
    if hp.arch == "phi3":  # and for "phi3" (no sliding window unless the config sets one)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_sliding_window(int(hp.config.get("sliding_window") or 0))
    if hp.explicit_head_dim and hp.arch != "gemma3":
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if hp.rope_linear_factor is not None:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_linear_factor)
    w.add_file_type(int(_FILE_TYPE[qtype]))
    w.add_quantization_version(GGML_QUANT_VERSION)

    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    adders["pad"] = w.add_pad_token_id
    for key, tid in vocab.special.items():
        adders[key](tid)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)

    for key, value in metadata.items():
        if key in w.kv_data[0] or key.startswith(("tokenizer.", f"{hp.arch}.")) or key == "general.architecture":
            raise ValueError(f"metadata key {key!r} is reserved: the GGUF writer sets it from the model")
        w.add_string(key, value)
