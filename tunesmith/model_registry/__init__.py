"""The model registry: versions of trained models, stages, canary share, rollback.

Not part of core; ``tunesmith registry`` is its command and the pipeline's
``register`` stage reaches it through the registry-backend plugins.
"""
