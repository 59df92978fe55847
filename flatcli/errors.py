"""The one error type for what a user can fix."""


class FlatcliError(Exception):
    """A mistake the user can fix: a bad value, a missing file, a mismatch.

    The message says what is wrong (with the value) and how to fix it, in the form
    ``"<what is wrong> — <how to fix it>"``. The CLI prints it as one line on stderr and exits 2.
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what, self.fix = what, fix
        super().__init__(f"{what} — {fix}" if fix else what)
