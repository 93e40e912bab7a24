"""Built-in chat templates, one module per template, each registered as an entry point.

Selected by the top-level ``chat_template:`` config key (see docs/models.md).
"""
