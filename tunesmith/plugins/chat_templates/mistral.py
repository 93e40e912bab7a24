"""Mistral instruct (``[INST] ... [/INST]answer</s>``); a system prompt opens the first user turn."""

from __future__ import annotations

from tunesmith import hookimpl

TEMPLATE = (
    "{{- bos_token if bos_token else '' }}"
    "{%- set ns = namespace(system='', first=true) %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] %}"
    "{%- elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{%- if ns.first and ns.system %}{{ ns.system + '\\n\\n' }}{%- endif %}"
    "{%- set ns.first = false %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# [[eos_token]] is replaced by the tokenizer's EOS when the Modelfile is written
OLLAMA = """{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- if eq .Role "user" }}[INST] {{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }}{{ .Content }}[[eos_token]]
{{- end }}
{{- end }}"""


class Mistral:
    name = "mistral"
    description = "Mistral instruct: user turns wrapped in INST markers, the answer ended by EOS"
    template = TEMPLATE
    special_tokens = ()
    end_of_turn = None  # the tokenizer's EOS
    default_system = None
    ollama_template = OLLAMA
    stop = ("[INST]",)


@hookimpl
def register_chat_templates(register):  # type: ignore[no-untyped-def]
    register(Mistral())
