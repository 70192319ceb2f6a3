"""Capacity planning: how many GPUs of which kind, at what latency and cost, for a load."""
