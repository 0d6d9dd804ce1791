"""tunelab: fine-tuning language models with Hydra + PyTorch Lightning."""

__version__ = "0.1.0"
