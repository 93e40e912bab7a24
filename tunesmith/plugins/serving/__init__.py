"""Built-in serving engines: ``transformers`` (in-process), ``vllm`` and ``llamacpp``
(hand-offs that check the adapters against the other server's limits and start it)."""
