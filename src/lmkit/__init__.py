"""lmkit: a folder of text in, a trained, evaluated and published GPT-2-class language model out."""

__version__ = "0.1.0"
