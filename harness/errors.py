"""User-facing errors: one line naming the field and the fix, printed by the CLI without a traceback."""


class UserError(Exception):
    """Bad input or environment; the CLI prints `kimi-bench: error: <message>` and exits 2."""


def suggest(name: str, choices) -> str:
    """The "did you mean" tail of a one-line error: the closest names (difflib) and the full list."""
    import difflib

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}(choices: {', '.join(choices)})"


def show_key(part) -> str:
    """A field path part as printed in an error: plain names as they are, anything odd (spaces, control
    characters, empty) quoted."""
    text = str(part)
    return text if text.isprintable() and text and not any(c.isspace() for c in text) else repr(text)
