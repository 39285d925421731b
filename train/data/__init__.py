"""Data for training: the embedded corpus, tokenizers, ArrayRecord preparation and the grain pipeline."""
