"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class PlantmixError(Exception):
    """An error caused by the user's input (recipe, data, arguments), explained in one line."""

    exit_code = 2


class ShortfallError(PlantmixError):
    """A mix asks for more rows of a domain than the build holds."""
