"""The one exception type for user mistakes: the CLI prints it as a single line, no traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (bad option, unknown model, unusable dataset, ...).

    The message says what is wrong and what to do about it.
    """
