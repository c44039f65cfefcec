"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class PrismError(Exception):
    """An error the user can fix; the message says what was wrong and what to do."""


class ConfigError(PrismError):
    pass


class DataError(PrismError):
    pass


class ModelFileError(PrismError):
    pass
