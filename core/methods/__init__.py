"""Method families; importing this package registers every method in ``core.METHODS``."""

from . import lora  # noqa: F401
