"""llmctl: from your own text to a trained, measured language model."""

__version__ = "0.1.0"
