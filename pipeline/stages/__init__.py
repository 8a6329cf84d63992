"""The DVC stages, one module per stage of dvc.yaml; they never import each other."""
