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
    """The bytes of the regular file `path` (files.read_capped with the checkpoint cap, the largest file prismfl
    reads); kept for rundir.load_checkpoint: everything else calls read_capped with its own kind's cap."""
    from prismfl.files import MAX_CHECKPOINT_BYTES, read_capped

    return read_capped(path, MAX_CHECKPOINT_BYTES, "checkpoint", error, missing)
