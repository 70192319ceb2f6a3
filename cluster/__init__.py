"""The coordinator (attention, KV cache, routers), the engine loop, placement and the CLI."""
