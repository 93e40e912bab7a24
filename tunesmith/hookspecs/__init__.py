"""The hook contract of tunesmith, one module per area.

Every ``register_*`` hook receives a ``register`` callback::

    register(obj, replaces=None)

``obj`` is a small object with ``name`` (unique in its area), ``description`` (one
line), optionally ``Options`` (a pydantic model that validates the object's section of
the config; extra keys are errors) and the methods its area's protocol lists. Pass
``replaces="lora"`` to take over a built-in's name on purpose; two plugins claiming one
name without that is an error that names both distributions.

Registration must be cheap: import torch, transformers and friends inside methods.
"""

from tunesmith.hookspecs import cli, data, evaluation, export, models, objectives, serving, templates, tracking, training

#: The spec modules, in the order the plugin manager adds them.
SPEC_MODULES = (models, templates, data, objectives, training, tracking, evaluation, export, serving, cli)

__all__ = ["SPEC_MODULES", "cli", "data", "evaluation", "export", "models", "objectives", "serving", "templates", "tracking", "training"]
