"""ChatML (``<|im_start|>role ... <|im_end|>``): Qwen, SmolLM, Hermes, many instruct models."""

from __future__ import annotations

from tunesmith import hookimpl

TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

OLLAMA = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


class ChatML:
    name = "chatml"
    description = "ChatML: <|im_start|>role\\n...<|im_end|> (Qwen, SmolLM, Hermes)"
    template = TEMPLATE
    special_tokens = ("<|im_start|>", "<|im_end|>")
    end_of_turn = "<|im_end|>"
    default_system = None
    ollama_template = OLLAMA
    stop = ("<|im_end|>", "<|im_start|>")


@hookimpl
def register_chat_templates(register):  # type: ignore[no-untyped-def]
    register(ChatML())
