"""Expert workers: each holds one expert's w1, w2, w3 for every layer."""
