"""Built-in experiment loggers (``training.report_to``): jsonl, tensorboard, mlflow, wandb."""
