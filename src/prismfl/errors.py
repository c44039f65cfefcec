"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class PrismError(Exception):
    """An error the user can fix; the message says what was wrong and what to do."""


class ConfigError(PrismError):
    pass


class DataError(PrismError):
    pass


class ModelFileError(PrismError):
    pass


def read_file_bytes(path, error: type[PrismError], missing: str) -> bytes:
    """The bytes of `path`; a missing or unreadable file raises `error` with one line (`missing` if absent)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(missing) from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
