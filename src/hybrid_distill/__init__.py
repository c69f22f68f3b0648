"""hybrid-distill: distill softmax-attention LLMs into hybrid softmax/linear-attention models."""

__version__ = "0.1.0"
