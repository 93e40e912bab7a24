"""Llama 3 (``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``)."""

from __future__ import annotations

from tunesmith import hookimpl

TEMPLATE = (
    "{{- bos_token if bos_token else '' }}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# BOS is left to the runtime (llama.cpp adds it when tokenizer.ggml.add_bos_token says so)
OLLAMA = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""


class Llama3:
    name = "llama3"
    description = "Llama 3: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>"
    template = TEMPLATE
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    end_of_turn = "<|eot_id|>"
    default_system = None
    ollama_template = OLLAMA
    stop = ("<|eot_id|>", "<|start_header_id|>")


@hookimpl
def register_chat_templates(register):  # type: ignore[no-untyped-def]
    register(Llama3())
