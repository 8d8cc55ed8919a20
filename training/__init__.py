"""parsimony training: multi-task data, models, losses, metrics and the `training.run` command."""
