"""One exception type for bad input: the CLI prints its message as one line, never a traceback."""

import argparse
import os


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


def output_file(path: str) -> str:
    """argparse `type` for a file a run writes at its end (e.g. --output_json): its folder is made while the arguments
    are parsed, so a bad path is a one-line usage error before the run rather than a traceback that loses it."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot create the folder {folder} ({e.strerror}): choose a writable path")
    return path
