"""The core: plugin manager, registries, config, run directories, errors.

Nothing here imports a technique: the techniques are plugins.
"""
