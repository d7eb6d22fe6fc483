"""chatos-retrain: continuous, hands-off LoRA retraining from a ChatOS conversation store."""

__version__ = "0.1.0"
