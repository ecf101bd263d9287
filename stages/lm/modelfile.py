"""An Ollama `Modelfile` for a released GGUF: FROM the file, the chat template in Ollama's Go-template syntax, stop
tokens, and the system prompt the adapter was trained with.

Ollama's templates are Go templates, not the Jinja of `chat_template`, so only the two chat formats our supported
families ship are translated: ChatML (`<|im_start|>`: SmolLM2, Qwen2/2.5/3) and Llama 3 (`<|start_header_id|>`).
For any other template the Modelfile has no TEMPLATE line, and Ollama falls back to the template it recognises from
the GGUF's own `tokenizer.chat_template`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@dataclass(frozen=True)
class ChatFormat:
    template: str | None
    stops: tuple[str, ...]


def chat_format(chat_template: str | None, eos_token: str | None) -> ChatFormat:
    """The Go template and stop strings for a Jinja chat template (None template when it is not one we know)."""
    jinja = chat_template or ""
    if "<|im_start|>" in jinja:
        template, stops = CHATML, ["<|im_end|>"]
    elif "<|start_header_id|>" in jinja:
        template, stops = LLAMA3, ["<|eot_id|>"]
    else:
        template, stops = None, []
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return ChatFormat(template, tuple(stops))


def template_system_prompt(rendered: str) -> str | None:
    """The system text a chat template inserts on its own (render it for one user message and pass the result),
    for the two formats above; None when it inserts none."""
    for start, end in (
        ("<|im_start|>system\n", "<|im_end|>"),
        ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    ):
        i = rendered.find(start)
        if i != -1:
            j = rendered.find(end, i + len(start))
            return rendered[i + len(start) : j] if j != -1 else None
    return None


def render_modelfile(gguf_relpath: str, fmt: ChatFormat, system_prompt: str | None) -> str:
    """The Modelfile text: template and system prompt verbatim in triple quotes, stop strings as quoted strings."""
    lines = [f"FROM ./{gguf_relpath}"]
    for instruction, text in (("TEMPLATE", fmt.template), ("SYSTEM", system_prompt)):
        if text:
            if '"""' in text:
                raise ValueError(f"a {instruction.lower()} containing triple quotes cannot be written to a Modelfile")
            lines.append(f'{instruction} """{text}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in fmt.stops]
    return "\n".join(lines) + "\n"
