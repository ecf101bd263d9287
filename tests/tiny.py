"""Tiny offline test assets: a ChatML BPE tokenizer trained on the fly and random Llama/Qwen2 models.

No hub, no downloads: everything is built from a few sentences in a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Hello, how are you today? I am fine, thank you for asking.",
    "Tell me a joke about computers. Why did the computer sneeze? It had a virus.",
    "What do you like to eat? I like bread, cheese, apples and soup.",
    "Can you write a function in Python? def add(a, b): return a + b",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } ' \" - _",
]

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
"""Llama 3.1's rope scaling with a 64-token original context, so it moves most frequencies of a tiny model."""

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_level_bpe(specials: list[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen style) trained on CORPUS with `specials` as added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 384) -> Any:
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(SPECIALS, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


LLAMA3_CHAT = (
    "{{- bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama 3's chat template (3.0, without tools): BOS, a header per turn, `<|eot_id|>` closing each."""


def build_llama3_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE with Llama 3's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level_bpe(specials, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.chat_template = LLAMA3_CHAT
    return fast


def build_sentencepiece_tokenizer(vocab_size: int = 512) -> Any:
    """Llama 2 / Mistral / TinyLlama style: BPE with byte fallback (`<0x00>`…`<0xFF>` in the vocab), `▁` for
    spaces put before the text (Metaspace, prepend "first"), `<unk>`/`<s>`/`</s>`, no BOS added by the post-processor
    (so its ids compare one to one with a reader's tokenization of the same text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [*specials, *bytes_] + [
        p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])[len(specials) :]
    ]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = LLAMA2_CHAT
    return fast


LLAMA2_CHAT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"
)


def tiny_config(arch: str = "llama", vocab_size: int = 384, **overrides: Any) -> Any:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    common.update(overrides)
    if arch == "qwen3":
        common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])
    if arch == "phi3":
        common.setdefault("sliding_window", None)
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}
    if arch in ("gemma2", "gemma3"):  # llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B model
        head_dim = common["hidden_size"] // common["num_attention_heads"]
        common.setdefault("head_dim", head_dim)
        common.setdefault("query_pre_attn_scalar", common["head_dim"])
    if arch in ("gemma2", "gemma3"):  # a window shorter than the test texts, so sliding layers differ from global
        common.setdefault("sliding_window", 8)
    if arch == "gemma3":  # a sliding layer (rope base 10k) then a global one (1M), as its 5:1 layers alternate
        n = common["num_hidden_layers"]
        common.setdefault("layer_types", ["sliding_attention"] * (n - 1) + ["full_attention"])
    cls = {**classes, "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[arch]
    return cls(**common)


def make_model_dir(
    path: Path, arch: str = "llama", seed: int = 0, tokenizer: str = "byte-level", **overrides: Any
) -> Path:
    """A random model saved like a real HF checkpoint (bf16 safetensors + tokenizer with chat template);
    `tokenizer`: "byte-level" (GPT-2/Llama 3/Qwen style) or "sentencepiece" (Llama 2/Mistral style)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer() if tokenizer == "byte-level" else build_sentencepiece_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 40) -> list[dict[str, str]]:
    subjects = ["cats", "dogs", "bread", "Paris", "Python", "soup", "apples", "computers", "the fox", "cheese"]
    rows = []
    for i in range(n):
        s = subjects[i % len(subjects)]
        rows.append(
            {
                "instruction": f"Question {i}: what do you know about {s}?",
                "response": f"Answer {i}: {s} are nice, and {i} is a number.",
            }
        )
    return rows


def params_for(tmp: Path, model_dir: Path, data_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A params mapping that keeps every output (artifacts, metrics, MLflow) under tmp."""
    raw: dict[str, Any] = {
        "model": {"source": "local", "path": str(model_dir)},
        "data": {"source": "local", "path": str(data_path), "max_length": 256},
        "tracking": {
            "mlflow": False,
            "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
            "artifacts_dir": str(tmp / "artifacts"),
            "metrics_dir": str(tmp / "metrics"),
            "dvc_commit": False,
        },
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def whole_run_params(tmp: Path, model_dir: Path, data_path: Path, gguf_types: list[str]) -> dict[str, Any]:
    """params_for with every stage sized for seconds, MLflow on, and releases published under tmp."""
    raw = params_for(
        tmp,
        model_dir,
        data_path,
        train={"batch_size": 4, "max_steps": 4, "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3},
        evaluate={"batch_size": 4, "num_generations": 1, "max_new_tokens": 4},
        export={"gguf_types": gguf_types, "gptq_calibration_samples": 8},
        release={"allow_dirty": True, "publish_dir": str(tmp / "releases")},
    )
    raw["tracking"]["mlflow"] = True
    return raw
