"""One exception type for failures a user can fix; the CLI prints it as a single line."""


class NLAError(Exception):
    """Bad input or configuration: the message names the cause (file, field, value)."""
