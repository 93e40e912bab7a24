"""Gemma (``<start_of_turn>user|model ... <end_of_turn>``); a system prompt opens the first user turn."""

from __future__ import annotations

from tunesmith import hookimpl

TEMPLATE = (
    "{{- bos_token if bos_token else '' }}"
    "{%- set ns = namespace(system='', first=true) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] %}"
    "{%- else %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if role == 'user' and ns.first and ns.system %}{{ ns.system + '\\n\\n' }}{%- endif %}"
    "{%- if role == 'user' %}{%- set ns.first = false %}{%- endif %}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)

OLLAMA = """{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


class Gemma:
    name = "gemma"
    description = "Gemma: <start_of_turn>user|model ... <end_of_turn>; system joins the first user turn"
    template = TEMPLATE
    special_tokens = ("<start_of_turn>", "<end_of_turn>")
    end_of_turn = "<end_of_turn>"
    default_system = None
    ollama_template = OLLAMA
    stop = ("<end_of_turn>", "<start_of_turn>")


@hookimpl
def register_chat_templates(register):  # type: ignore[no-untyped-def]
    register(Gemma())
