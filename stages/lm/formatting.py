"""Chat-template formatting, tokenization and response-only labels; plain documents labelled throughout.

The loss covers the assistant's replies and the token that closes each turn (so the model learns to stop), never
the system prompt, the user's messages or the template's framing. A multi-turn conversation is rendered prefix by
prefix: the text up to each assistant turn (with the generation prompt) and through it; every rendering must extend
the previous one, which is what lets each token be attributed to the turn that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.lm.conversations import Document, Record

IGNORE_INDEX = -100
TEXT_PROMPT_TOKENS = 32
"""A text test row's generation prompt is its first tokens (at most this many, at most half the row)."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def messages_for(record: Record, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation up to (not including) the reply: system, earlier turns, the last user message."""
    msgs = []
    system = record.system or system_prompt
    if system:
        msgs.append({"role": "system", "content": system})
    msgs += [{"role": role, "content": text} for role, text in record.history]
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


def _reply_labels(reply_ids: list[int], eot: set[int], trained: bool) -> list[int]:
    """Label a reply through its first end-of-turn token; whatever the template adds after it is framing."""
    n_reply = next((i + 1 for i, t in enumerate(reply_ids) if t in eot), len(reply_ids))
    if not trained:
        return [IGNORE_INDEX] * len(reply_ids)
    return reply_ids[:n_reply] + [IGNORE_INDEX] * (len(reply_ids) - n_reply)


def encode_record(
    tokenizer: Any,
    record: Record,
    system_prompt: str | None,
    max_length: int,
    eot: set[int],
    train_on: str = "all_assistant_turns",
) -> Encoded | None:
    """Token ids and labels; None when the prompt alone leaves no room for a reply within max_length.

    Too long a conversation is cut after the last assistant turn that fits (a turn boundary), else at max_length.
    """
    msgs = messages_for(record, system_prompt)
    turns = [*msgs, {"role": "assistant", "content": record.response}]
    replies = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    ids: list[int] = []
    labels: list[int] = []
    boundaries: list[int] = []  # token count after each assistant turn
    rendered = ""
    for i in replies:
        head = tokenizer.apply_chat_template(turns[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
        if not (head.startswith(rendered) and full.startswith(head)):
            raise InputError(
                "the chat template renders a conversation's earlier turns differently once later turns follow; "
                "per-turn labels need a prefix-stable template (set data.train_on: last_assistant_turn and give "
                "single-turn rows, or fix the template)"
            )
        head_ids = tokenizer(head[len(rendered) :], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        trained = train_on == "all_assistant_turns" or i == replies[-1]
        ids += head_ids + reply_ids
        labels += [IGNORE_INDEX] * len(head_ids) + _reply_labels(reply_ids, eot, trained)
        boundaries.append(len(ids))
        rendered = full
    first_label = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if len(ids) <= max_length:
        return Encoded(input_ids=ids, labels=labels, truncated=False)
    fitting = [b for b in boundaries if b <= max_length and any(lab != IGNORE_INDEX for lab in labels[:b])]
    if fitting:
        cut = fitting[-1]
    elif first_label >= max_length:
        return None
    else:
        cut = max_length
    return Encoded(input_ids=ids[:cut], labels=labels[:cut], truncated=True)


def encode_document(tokenizer: Any, doc: Document, max_length: int) -> list[Encoded]:
    """The document as a served model reads raw text (the tokenizer's own BOS, when it adds one) closed by EOS, so
    the model learns where a document ends; cut into consecutive pieces of max_length, every token labelled. A
    one-token tail has nothing to predict and is dropped."""
    ids = tokenizer(doc.text)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = [*ids, eos]
    pieces = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    pieces = [piece for piece in pieces if len(piece) > 1]
    return [Encoded(input_ids=piece, labels=list(piece), truncated=len(ids) > max_length) for piece in pieces]


def text_prompt_and_reference(tokenizer: Any, ids: list[int]) -> tuple[str, str]:
    """A text row's generation prompt (its first tokens) and the text that follows it, for the evaluation report."""
    n = min(TEXT_PROMPT_TOKENS, len(ids) // 2)
    return (
        tokenizer.decode(ids[:n], skip_special_tokens=True),
        tokenizer.decode(ids[n:], skip_special_tokens=True),
    )
