"""The error type that every ``surgery`` command raises for a clean, one-line failure."""


class CommandError(Exception):
    """A failure the CLI reports as one line on stderr with a non-zero exit status.

    It lives in its own module so that ``python -m pipeline.cli.main``, where the entry
    module is ``__main__``, still catches the class that the commands raise.
    """

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status
