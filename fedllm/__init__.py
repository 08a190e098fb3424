"""fedllm: federated fine-tuning of language models with exact model-space aggregation."""

__version__ = "0.1.0"
