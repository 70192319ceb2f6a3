"""`moe-cluster bench`: the cluster against transformers' generate, side by side, in one run."""
