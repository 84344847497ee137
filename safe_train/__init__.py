"""safe-train: train and finetune CLIP with OpenCLIP without learning planted backdoors."""

__version__ = "0.1.0"
