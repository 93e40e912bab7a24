"""Built-in model-registry back-ends (``registry.backend``): local versions.json, MLflow Model Registry."""
