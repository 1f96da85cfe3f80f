"""The one error every configuration check raises."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""
