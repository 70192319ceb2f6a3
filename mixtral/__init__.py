"""Neutral model package: config, checkpoint reading and the per-layer math.

Imported by the coordinator (`cluster`), the expert workers (`workers`) and the router
(`router`); it imports none of them, so there is no cycle between the roles.
"""
