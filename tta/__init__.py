"""tta: a PyTorch Lightning framework for text-to-audio generation research."""

__version__ = "0.1.0"
