"""orchestrator: fine-tune torchvision image classifiers, locally or on a Ray cluster."""

__version__ = "0.1.0"
