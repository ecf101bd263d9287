"""The data shapes users bring (pairs, alpaca, OpenAI `messages`, ShareGPT `conversations`) and multi-turn labels.

The label oracle is independent of the product's prefix rendering: it renders the whole conversation once, finds each
assistant message and the end-of-turn token after it in that text, and labels exactly the tokens whose character
offsets fall inside those spans.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipeline.stages import prepare
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.params import parse_params
from qlora_pipeline.stages.evaluate import test_record as stored_record
from qlora_pipeline.stages.lm import dataio, modelio
from qlora_pipeline.stages.lm.conversations import FieldNames, Record, parse_row
from qlora_pipeline.stages.lm.formatting import IGNORE_INDEX, encode_record, end_of_turn_ids, prompt_text
from tests import tiny

FIELDS = FieldNames(prompt="instruction", response="response", system=None)
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And what do you like to eat?"},
    {"role": "assistant", "content": "Bread, cheese and apples."},
    {"role": "user", "content": "Tell me a joke about computers."},
    {"role": "assistant", "content": "Why did the computer sneeze? It had a virus."},
]


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def chat_tokenizer(request):
    """SmolLM2-135M-Instruct's own tokenizer and template (from the embedded GGUF) and a Llama 3-template one."""
    if request.param == "llama3":
        return tiny.build_llama3_tokenizer(), "<|eot_id|>"
    from transformers import AutoTokenizer

    gguf = modelio.embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), "<|im_end|>"


def _oracle_labels(tok, messages: list[dict[str, str]], eot_text: str, last_only: bool) -> tuple[list[int], list[bool]]:
    full = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    assistant = [m for m in messages if m["role"] == "assistant"]
    for i, m in enumerate(assistant):
        start = full.index(m["content"], cursor)
        end = full.index(eot_text, start + len(m["content"])) + len(eot_text)
        cursor = end
        if not last_only or i == len(assistant) - 1:
            spans.append((start, end))
    mask = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


@pytest.mark.parametrize("train_on", ["all_assistant_turns", "last_assistant_turn"])
def test_multi_turn_labels_cover_exactly_the_assistant_turns(chat_tokenizer, train_on: str) -> None:
    tok, eot_text = chat_tokenizer
    record = parse_row(0, {"messages": CONVERSATION}, "messages", FIELDS)
    assert isinstance(record, Record) and len(record.history) == 4 and record.system == "You answer briefly."
    enc = encode_record(tok, record, None, 4096, end_of_turn_ids(tok), train_on)
    assert enc is not None and not enc.truncated
    ids, mask = _oracle_labels(tok, CONVERSATION, eot_text, last_only=train_on == "last_assistant_turn")
    assert enc.input_ids == ids  # the prefix-by-prefix tokenization equals the whole conversation's
    got = [lab != IGNORE_INDEX for lab in enc.labels]
    assert got == mask, [tok.decode([t]) for t, g, m in zip(ids, got, mask, strict=True) if g != m]
    assert all(lab == t for lab, t in zip(enc.labels, ids, strict=True) if lab != IGNORE_INDEX)
    n_turns = 3 if train_on == "all_assistant_turns" else 1
    assert sum(1 for lab in enc.labels if lab == tok.convert_tokens_to_ids(eot_text)) == n_turns


def test_a_long_conversation_is_cut_after_the_last_assistant_turn_that_fits() -> None:
    tok = tiny.build_tokenizer()
    record = parse_row(0, {"messages": CONVERSATION}, "messages", FIELDS)
    eot = end_of_turn_ids(tok)
    whole = encode_record(tok, record, None, 4096, eot)
    assert whole is not None
    ends = [i + 1 for i, t in enumerate(whole.input_ids) if t in eot and whole.labels[i] != IGNORE_INDEX]
    assert len(ends) == 3
    cut = encode_record(tok, record, None, ends[1] + 3, eot)  # room for two turns and a bit of the third
    assert cut is not None and cut.truncated and len(cut.input_ids) == ends[1] + 1  # + the newline after <|im_end|>
    assert cut.input_ids == whole.input_ids[: len(cut.input_ids)]
    first_reply = next(i for i, lab in enumerate(whole.labels) if lab != IGNORE_INDEX)
    assert encode_record(tok, record, None, first_reply, eot) is None  # not even the first reply fits


def _write(path: Path, rows: list[dict]) -> Path:
    return tiny.write_jsonl(path, rows)


def test_each_format_is_detected_and_read(tmp_path: Path) -> None:
    sharegpt = [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "How are you?"},
        {"from": "gpt", "value": "Fine."},
    ]
    cases = {
        "pairs": [{"instruction": "q", "response": "a"}],
        "alpaca": [
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"instruction": "Hi", "output": "Yo"},
        ],
        "messages": [{"messages": CONVERSATION}],
        "sharegpt": [{"conversations": sharegpt}],
    }
    got = {}
    for name, rows in cases.items():
        raw = dataio.load_user_data(_write(tmp_path / f"{name}.jsonl", rows), "auto", FIELDS)
        assert raw.format == name and not raw.bad, (name, raw.bad)
        got[name] = raw.records
    assert got["alpaca"][0].prompt == "Translate\n\nchat" and got["alpaca"][1].prompt == "Hi"
    assert got["messages"][0].response == "Why did the computer sneeze? It had a virus."
    assert got["messages"][0].history[0] == ("user", "What is the capital of France?")
    (conv,) = got["sharegpt"]
    assert (conv.system, conv.history, conv.prompt, conv.response) == (
        "Be kind.",
        (("user", "Hi there"), ("assistant", "Hello!")),
        "How are you?",
        "Fine.",
    )


BAD_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},  # unknown role
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # empty reply
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},  # wrong type
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    },
    {"messages": "not a list"},
    {"messages": [{"role": "user", "content": "unanswered"}]},
]


def test_bad_rows_are_counted_by_reason_and_too_many_fail_in_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    good = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(40)
    ]
    data = _write(tmp_path / "d.jsonl", good + BAD_ROWS)
    params = tiny.params_for(tmp_path, tiny_llama_dir, data, data={"max_bad_fraction": 0.2})
    m = prepare.run(parse_params(params))
    assert m.metrics["data_format"] == "messages"
    assert m.metrics["bad_rows"] == {
        "unknown role": 1,
        "empty assistant turn": 1,
        "content is not a string": 1,
        "two consecutive assistant turns": 1,
        "turns are not a non-empty list": 1,
        "no assistant turn": 1,
    }
    assert m.metrics["records_read"] == 46 and m.metrics["records_after_dedupe"] == 40
    report = (tmp_path / "artifacts" / "prepare" / "data_report.md").read_text()
    assert "Format `messages`: 46 rows read, 6 unreadable, 40 kept" in report and "| unknown role | 1 |" in report

    data = _write(tmp_path / "worse.jsonl", good[:4] + [BAD_ROWS[0]] * 3 + BAD_ROWS[1:3])
    params = tiny.params_for(tmp_path / "w", tiny_llama_dir, data)
    with pytest.raises(InputError) as err:
        prepare.run(parse_params(params))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "5 of 9 rows (56%) cannot be read as messages data, most for 'unknown role' (3, first at row 4)"
    )


def test_evaluation_prompts_keep_each_rows_system_prompt_and_history() -> None:
    tok = tiny.build_tokenizer()
    row = {
        "prompt": "And now?",
        "response": "Now this.",
        "system": "Speak like a pirate.",
        "history": json.dumps([["user", "Hi"], ["assistant", "Ahoy"]]),
    }
    text = prompt_text(tok, stored_record(row), "the run's default system prompt")
    assert text == tok.apply_chat_template(
        [
            {"role": "system", "content": "Speak like a pirate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Ahoy"},
            {"role": "user", "content": "And now?"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
