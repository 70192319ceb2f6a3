"""Errors in the model's files or settings that a user can fix; each message says how."""


class ModelError(ValueError):
    """A checkpoint, preset or dtype the model cannot be built from."""


class CheckpointError(ModelError):
    """The checkpoint is missing, corrupt or not a Mixtral checkpoint."""
