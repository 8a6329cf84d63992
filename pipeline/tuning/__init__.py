"""Hyperparameter search: the Optuna objective and the study storage."""
