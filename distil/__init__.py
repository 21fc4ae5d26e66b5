"""distil-run: knowledge distillation of BERT-family masked language models."""

__version__ = "0.1.0"
