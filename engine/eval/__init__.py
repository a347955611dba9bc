"""Evaluation: weighted k-NN on frozen features, and attention maps."""
