"""Tokenizers, prompts and datasets."""
