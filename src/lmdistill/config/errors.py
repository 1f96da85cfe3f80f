"""The one error every configuration check raises."""

from lmdistill.io import UserError


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it."""
