"""The base of every error a user can fix: a config value, a file, a server, a run directory.

Each such error class of the package subclasses :class:`UserError` (and the builtin it has always
been, e.g. ``ValueError``), with a message that names what is wrong and how to fix it. The command
line prints one as a single line and exits with status 2; any other exception is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message names it (file, line, key, URL) and says how."""
