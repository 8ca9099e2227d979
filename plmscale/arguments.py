"""argparse value types shared by the `plmscale` commands and `plmscale prep` (data_prep): a bad value is
argparse's one-line usage error, naming the option."""

import argparse


def positive(kind: type):
    """A number of `kind` above 0."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def fraction(text: str) -> float:
    """A float in [0, 1)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value
