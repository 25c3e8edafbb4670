"""Error types. Every message says what was wrong, what was expected and how to fix it."""


class OmniPeftError(Exception):
    """Base class of every error omnipeft raises on purpose."""


class ConfigError(OmniPeftError, ValueError):
    """A method config field is out of range or of the wrong type."""


class TargetError(OmniPeftError, ValueError):
    """A target name matched nothing, or matched a module the method cannot wrap."""


class MergeError(OmniPeftError, RuntimeError):
    """Merging or unmerging was asked of adapters that cannot do it, or in the wrong state."""


class CheckpointError(OmniPeftError, ValueError):
    """An adapter checkpoint is missing, corrupt, or does not fit the model."""
