"""Alpaca (``### Instruction: / ### Input: / ### Response:``): the guide's form for base models.

The default for a tokenizer that ships no chat template: it needs no new tokens
(the tokenizer's EOS ends a response), so a base model trains with it as it is.
A user turn may carry an ``input`` field, rendered as the ``### Input:`` block.
"""

from __future__ import annotations

from tunesmith import hookimpl

SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

TEMPLATE = (
    "{%- set ns = namespace(system='" + SYSTEM + "') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- set ns.system = message['content'] %}{%- endif %}"
    "{%- endfor %}"
    "{%- if ns.system %}{{ ns.system + '\\n\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- if message.get('input') %}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{%- endif %}"
    "{{ '### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# [[eos_token]] is replaced by the tokenizer's EOS when the Modelfile is written
OLLAMA = """{{- if .System }}{{ .System }}

{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}### Instruction:
{{ .Content }}

### Response:
{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}[[eos_token]]

{{ end }}
{{- end }}
{{- end }}"""


class Alpaca:
    name = "alpaca"
    description = "Alpaca: ### Instruction / ### Input / ### Response (the default for base models)"
    template = TEMPLATE
    special_tokens = ()
    end_of_turn = None  # the tokenizer's EOS
    default_system = SYSTEM
    ollama_template = OLLAMA
    stop = ("### Instruction:",)


@hookimpl
def register_chat_templates(register):  # type: ignore[no-untyped-def]
    register(Alpaca())
