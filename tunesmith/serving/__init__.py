"""Serving: the OpenAI-compatible server over one base model and many adapters.

Not part of core: it uses core's model loading and the plugin registries, and
core never imports it. ``tunesmith serve`` is its command.
"""
