"""Chat-template formatting, tokenization and response-only labels.

The loss covers the assistant's reply and the token that closes its turn (so the model learns to stop),
never the system prompt, the user's message or the template's framing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.lm.dataio import Record

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def messages_for(record: Record, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = []
    system = record.system or system_prompt
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": record.prompt})
    return msgs


def prompt_text(tokenizer: Any, record: Record, system_prompt: str | None) -> str:
    """The text a served model sees before it answers (used for generation too)."""
    return tokenizer.apply_chat_template(
        messages_for(record, system_prompt), add_generation_prompt=True, tokenize=False
    )


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


def check_chat_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"the tokenizer in {where} has no chat template; use an instruct model or add "
            "chat_template to tokenizer_config.json"
        )


def encode_record(
    tokenizer: Any, record: Record, system_prompt: str | None, max_length: int, eot: set[int]
) -> Encoded | None:
    """Token ids and labels; None when the prompt alone leaves no room for a reply within max_length."""
    msgs = messages_for(record, system_prompt)
    head = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": record.response}], tokenize=False)
    if not full.startswith(head):
        raise InputError(
            "the chat template renders the prompt differently with and without the reply; "
            "response-only labels need a prefix-stable template"
        )
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    if len(head_ids) >= max_length:
        return None
    # Label the reply through the first end-of-turn token; whatever the template adds after it is framing.
    n_reply = len(tail_ids)
    for i, t in enumerate(tail_ids):
        if t in eot:
            n_reply = i + 1
            break
    ids = head_ids + tail_ids
    labels = [IGNORE_INDEX] * len(head_ids) + tail_ids[:n_reply] + [IGNORE_INDEX] * (len(tail_ids) - n_reply)
    truncated = len(ids) > max_length
    return Encoded(input_ids=ids[:max_length], labels=labels[:max_length], truncated=truncated)
