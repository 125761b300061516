"""The one exception type users see: it says what went wrong and what to do about it."""


class MBCError(Exception):
    """A problem with the user's input, models or files, with a message that names the fix."""
