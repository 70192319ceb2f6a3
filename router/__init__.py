"""Routing, dispatch and combine: [Router] -> [Dispatch] -> [Experts] -> [Combine]."""
