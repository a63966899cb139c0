"""User-facing errors: one line naming the field and the fix, printed by the CLI without a traceback."""


class UserError(Exception):
    """Bad input or environment; the CLI prints `kimi-bench: error: <message>` and exits 2."""
