"""One exception type for bad input: the CLI prints its message as one line, never a traceback."""


class UserError(Exception):
    """Bad input from the user. The message names the problem and the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
