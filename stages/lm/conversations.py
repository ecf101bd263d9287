"""The data shapes users bring, read into two record types: prompt/response pairs, alpaca, OpenAI-style `messages`
and ShareGPT `conversations` as chat, `text` as plain documents (docs/data.md).

A chat row becomes a :class:`Record`: an optional system prompt, the earlier turns, the last user message and the
last assistant reply; a text row a :class:`Document`. A row that cannot be one is a :class:`BadRow` with a short reason
(counted per reason by prepare), never an exception: one broken row in a million must not stop a run, a broken
dataset must (``data.max_bad_fraction``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from qlora_pipeline.stages.contract.errors import InputError

DataFormat = Literal["pairs", "alpaca", "messages", "sharegpt", "text"]
FORMATS: tuple[str, ...] = ("pairs", "alpaca", "messages", "sharegpt", "text")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT `from` values as the datasets in the wild spell them, mapped to chat-template roles."""


@dataclass(frozen=True)
class Record:
    """One training example: a system prompt, earlier turns (role, text) of a multi-turn conversation, the last user
    message and the assistant reply to it."""

    prompt: str
    response: str
    system: str | None = None
    category: str = ""
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Document:
    """Plain text for continued pretraining or completion: no chat template, the loss on every token."""

    text: str
    category: str = ""


Example = Record | Document


@dataclass(frozen=True)
class BadRow:
    index: int
    reason: str


@dataclass(frozen=True)
class FieldNames:
    """The pairs format's column names (params `data.prompt_field`, `response_field`, `system_field`) and the text
    format's (`data.text_field`)."""

    prompt: str
    response: str
    system: str | None
    text: str = "text"


def detect_format(columns: Iterable[str], fields: FieldNames) -> DataFormat:
    """The format a table's columns say it is in: the configured pair fields first (so existing params keep their
    meaning), then `messages`, `conversations`, alpaca's `instruction` + `output`, then the text field."""
    cols = set(columns)
    if {fields.prompt, fields.response} <= cols:
        return "pairs"
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if fields.text in cols:
        return "text"
    raise InputError(
        f"cannot tell the dataset's format from its fields ({', '.join(sorted(cols))}): expected "
        f"'{fields.prompt}' + '{fields.response}' (data.prompt_field / data.response_field), 'messages', "
        f"'conversations', 'instruction' + 'output' or '{fields.text}' (data.text_field); set data.format or the "
        "field names"
    )


def required_columns(fmt: DataFormat, fields: FieldNames) -> list[str]:
    return {
        "pairs": [fields.prompt, fields.response] + ([fields.system] if fields.system else []),
        "alpaca": ["instruction", "output"],
        "messages": ["messages"],
        "sharegpt": ["conversations"],
        "text": [fields.text],
    }[fmt]


def parse_row(index: int, row: Mapping[str, Any], fmt: DataFormat, fields: FieldNames) -> Example | BadRow:
    """One table row as a record, or why it cannot be one."""
    if fmt == "text":
        text = row.get(fields.text)
        if not isinstance(text, str):
            return BadRow(index, "text is not a string")
        return Document(text) if text.strip() else BadRow(index, "empty text")
    if fmt == "pairs":
        system = row.get(fields.system) if fields.system else None
        return _pair(index, row.get(fields.prompt), row.get(fields.response), system)
    if fmt == "alpaca":
        instruction, extra = row.get("instruction"), row.get("input")
        if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
            instruction = f"{instruction.strip()}\n\n{extra.strip()}"
        return _pair(index, instruction, row.get("output"), row.get("system"))
    turns = row.get("messages" if fmt == "messages" else "conversations")
    if not isinstance(turns, list) or not turns:
        return BadRow(index, "turns are not a non-empty list")
    parsed: list[tuple[str, str]] = []
    for turn in turns:
        if not isinstance(turn, Mapping):
            return BadRow(index, "a turn is not an object")
        role, content = (turn.get("role"), turn.get("content")) if fmt == "messages" else _sharegpt(turn)
        if role not in ("system", "user", "assistant"):
            return BadRow(index, "unknown role")
        if not isinstance(content, str):
            return BadRow(index, "content is not a string")
        parsed.append((role, content.strip()))
    return _conversation(index, parsed)


def _sharegpt(turn: Mapping[str, Any]) -> tuple[str | None, Any]:
    speaker = turn.get("from")
    return SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None, turn.get("value")


def _pair(index: int, prompt: Any, response: Any, system: Any) -> Record | BadRow:
    if prompt is None or response is None:
        return BadRow(index, "missing prompt or response")
    if not isinstance(prompt, str | int | float) or not isinstance(response, str | int | float):
        return BadRow(index, "prompt or response is not text")
    prompt, response = str(prompt).strip(), str(response).strip()
    if not prompt:
        return BadRow(index, "empty prompt")
    if not response:
        return BadRow(index, "empty assistant turn")
    return Record(prompt=prompt, response=response, system=str(system).strip() if system else None)


def _conversation(index: int, turns: list[tuple[str, str]]) -> Record | BadRow:
    """system? (user assistant)+ with the trailing unanswered user turns dropped."""
    system = None
    if turns[0][0] == "system":
        system, turns = turns[0][1] or None, turns[1:]
    if any(role == "system" for role, _ in turns):
        return BadRow(index, "system turn after the first")
    while turns and turns[-1][0] == "user":
        turns = turns[:-1]
    if not turns:
        return BadRow(index, "no assistant turn")
    if turns[0][0] != "user":
        return BadRow(index, "assistant turn before any user turn")
    for (r1, _), (r2, _) in itertools.pairwise(turns):
        if r1 == r2 == "assistant":
            return BadRow(index, "two consecutive assistant turns")
        if r1 == r2 == "user":
            return BadRow(index, "two consecutive user turns")
    if any(role == "assistant" and not content for role, content in turns):
        return BadRow(index, "empty assistant turn")
    if any(role == "user" and not content for role, content in turns):
        return BadRow(index, "empty user turn")
    history = tuple(turns[:-2])
    (_, prompt), (_, response) = turns[-2], turns[-1]
    return Record(prompt=prompt, response=response, system=system, history=history)


__all__ = [
    "FORMATS",
    "BadRow",
    "DataFormat",
    "Document",
    "Example",
    "FieldNames",
    "Record",
    "detect_format",
    "parse_row",
    "required_columns",
]
