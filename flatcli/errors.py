"""The one error type for what a user can fix."""


class FlatcliError(ValueError):
    """A mistake the user can fix: a bad value, a missing file, a mismatch.

    The message says what is wrong (with the value) and how to fix it, in the form
    ``"<what is wrong> — <how to fix it>"``. Raised by the library with the names Python callers use
    (keyword arguments); the CLI prints it as one line on stderr and exits 2, with the keyword names
    translated into the flags that set them. A ``ValueError``, so ``except ValueError`` catches it as it
    catches the optimizers' invalid-argument errors.
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what, self.fix = what, fix
        super().__init__(f"{what} — {fix}" if fix else what)
