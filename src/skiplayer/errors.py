"""One exception type for bad input: the CLI prints its message as one line, never a traceback."""


class UserError(Exception):
    """Bad input from the user. The message names the problem and the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def parse_enum(enum_type, value, what: str, flag: str):
    """`value` as a member of the str Enum `enum_type`, or a UserError naming the choices and the flag."""
    try:
        return enum_type(value)
    except ValueError:
        names = ", ".join(member.value for member in enum_type)
        raise UserError(f"unknown {what} '{value}': use one of {names} with {flag}") from None
