"""The tokenizer side of a GGUF export: a Hugging Face `tokenizer.json` as GGUF's GPT-2-style BPE vocabulary, with
`tokenizer.ggml.pre` chosen explicitly (docs/formats.md, GGUF)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from qlora_pipeline.kernels.formats.gguf_tensors import Hparams, read_json


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
    default: str, tok: dict[str, Any], tok_cfg: dict[str, Any], cfg: dict[str, Any], model_dir: Path, tokens: list[str]
) -> str:
    """Pick llama.cpp's pre-tokenizer name (the regex it splits text with before BPE).

    Order: SmolLM2 signals (a model/tokenizer name containing "smollm", or its 49152-token vocab starting with its
    special tokens) -> "smollm"; a Qwen2-style or Llama-3-style Split regex in tokenizer.json -> "qwen2"/"llama-bpe";
    a plain byte-level pre-tokenizer -> "gpt-2" (llama.cpp's spelling; "gpt2" is not recognised and would silently
    fall back to its default regex); otherwise the family's default (`Family.gguf_pre`).
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
    return default


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None
    model: str = "gpt2"
    """`tokenizer.ggml.model`: "gpt2" (byte-level BPE, merges) or "llama" (SentencePiece-style, scores)."""
    scores: list[float] | None = None
    add_space_prefix: bool = False


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _sentencepiece_style(tok: dict[str, Any]) -> bool:
    """BPE with byte fallback and `▁` for spaces (Llama 2, TinyLlama, Mistral, Gemma): llama.cpp's "llama" vocab."""
    model = tok.get("model") or {}
    spaces = _contains_type(tok.get("pre_tokenizer"), "Metaspace") or any(
        n.get("prepend") == "▁" or (n.get("content") == "▁") for n in _normalizers(tok.get("normalizer"))
    )
    return bool(model.get("byte_fallback")) and bool(spaces)


def _normalizers(node: Any) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    return [node, *(c for child in node.get("normalizers") or [] for c in _normalizers(child))]


def _space_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts `▁` before the text (Metaspace prepend_scheme first/always, or Prepend("▁"))."""
    for meta in _contains_type(tok.get("pre_tokenizer"), "Metaspace"):
        return meta.get("prepend_scheme", "always") in ("first", "always") and meta.get("add_prefix_space", True)
    return any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in _normalizers(tok.get("normalizer")))


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores from BPE merges: a token made by merge r scores -r, so llama.cpp's
    highest-score-first merging applies merges in the tokenizer's rank order; base pieces score 0."""
    rank = {}
    for r, m in enumerate(merges):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in tokens]


def read_tokenizer(model_dir: Path, cfg: dict[str, Any], hp: Hparams, pre_override: str | None) -> Vocab:
    tok = read_json(model_dir / "tokenizer.json")
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"tokenizer.json model type {model.get('type')!r} is not supported; GGUF export writes byte-level BPE only"
        )
    spm = _sentencepiece_style(tok)
    if model.get("byte_fallback") and not spm:
        raise ValueError(
            "a byte-fallback BPE tokenizer without `▁` spaces (Metaspace) is not supported by the GGUF writer"
        )
    if (
        not spm
        and not _contains_type(tok.get("pre_tokenizer"), "ByteLevel")
        and not _contains_type(tok.get("decoder"), "ByteLevel")
    ):
        raise ValueError(
            "tokenizer.json is neither byte-level BPE nor SentencePiece-style BPE with byte fallback; not supported"
        )

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
    if spm:
        for i, piece in enumerate(tokens):
            if _BYTE_TOKEN.match(piece) and i not in added:
                types[i] = int(TokenType.BYTE)
        unk = model.get("unk_token")
        if unk in tokens:
            types[tokens.index(unk)] = int(TokenType.UNKNOWN)
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
    if spm:  # llama.cpp's SentencePiece tokenizer: merges by score, no pre-tokenizer regex
        scores = _merge_scores(tokens, merges)
        return Vocab(
            tokens,
            types,
            [],
            "default",
            special,
            bool(add_bos),
            bool(add_eos),
            chat,
            "llama",
            scores,
            _space_prefix(tok),
        )
    pre = pre_override or _detect_pre(hp.family.gguf_pre, tok, tok_cfg, cfg, model_dir, tokens)
    return Vocab(tokens, types, merges, pre, special, bool(add_bos), bool(add_eos), chat)


# --------------------------------------------------------------------------------------------------------------------
# Type selection and quantization
# --------------------------------------------------------------------------------------------------------------------
