"""Command-line helpers: flags whose default depends on the detector family (--model), and the
upstream flags of features that dap-detr does not implement.

Family defaults work under every way of using the parser: main.py's, a child parser built with
parents=[get_args_parser()], the submitit launcher, several parses with one parser object. While
parsing, a family-dependent flag's default is a FamilyDefault placeholder. Giving --model replaces
the placeholders of the flags not given so far with that family's defaults (a flag given later
overrides as usual). If --model is not given, argparse converts each remaining placeholder with the
flag's type, as it does with every string default, and the type returns the default family's
value. Nothing is mutated after the parser is built.
"""
import argparse
import copy


class FamilyDefault(str):
    """The default of a family-dependent flag until the family is known (its text: the flag's dest)."""


class DefaultOr:
    """A family-dependent flag's type: the default family's value for the placeholder, the flag's
    own type (None: the text itself) for anything given on the command line."""

    def __init__(self, type_, value):
        self.type = type_
        self.value = value
        self.__name__ = getattr(type_, "__name__", "str")  # argparse's "invalid <type> value" messages

    def __call__(self, text):
        if isinstance(text, FamilyDefault):
            return copy.copy(self.value)
        return text if self.type is None else self.type(text)


class SelectFamily(argparse.Action):
    """--model: stores the family and gives every family-dependent flag not given so far that
    family's default. family_defaults ({dest: {family: value}}) is set by set_family_defaults."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.family_defaults = {}

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        for dest, values in self.family_defaults.items():
            if isinstance(getattr(namespace, dest, None), FamilyDefault):
                setattr(namespace, dest, copy.copy(values[value]))


def _show(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def set_family_defaults(parser, family_action, defaults_by_family):
    """Make every flag that one of the families' defaults names depend on family_action (the
    SelectFamily action of --model); call it once every flag has been added.

    defaults_by_family: {family: {dest: value}}, the values where a family departs from the flag's
    own default. --help shows the default family's value and every family's that differs.
    """
    default_family = family_action.default
    for dest in sorted({dest for defaults in defaults_by_family.values() for dest in defaults}):
        actions = [a for a in parser._actions if a.dest == dest]
        if not actions:
            raise ValueError(f"a family default names {dest!r}, which is no flag")
        base = actions[0].default
        values = {family: defaults.get(dest, base) for family, defaults in defaults_by_family.items()}
        family_action.family_defaults[dest] = values
        placeholder = FamilyDefault(dest)
        for action in actions:
            action.default = placeholder
            action.type = DefaultOr(action.type, values[default_family])
        others = [f"{family}: {_show(v)}" for family, v in values.items() if v != values[default_family]]
        shown = f"default {_show(values[default_family])}; " + ", ".join(others)
        actions[0].help = (f"{actions[0].help} ({shown})" if actions[0].help else shown).replace("%", "%%")


class Unsupported(argparse.Action):
    """An upstream flag of a feature that dap-detr does not implement: accepted by the parser so
    that an upstream command line gets a clear answer, and refused with one line when given."""

    def __init__(self, option_strings, dest, reason, nargs=None, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"error: {option_string} is not supported by dap-detr: {self.reason}\n")


def add_unsupported_upstream_flags(parser):
    """Upstream DETR's and Deformable DETR's flags of features not implemented here."""
    segmentation = "segmentation is not implemented (boxes only); drop the flag"
    unused = "upstream parses it but never reads it; drop the flag"
    for flag, nargs, reason in [
        ("--masks", 0, segmentation), ("--frozen_weights", None, segmentation),
        ("--mask_loss_coef", None, segmentation), ("--dice_loss_coef", None, segmentation),
        ("--coco_panoptic_path", None, "panoptic segmentation is not implemented; drop the flag"),
        ("--remove_difficult", 0, unused), ("--position_embedding_scale", None, unused),
        ("--lr_drop_epochs", "+", unused),
        ("--cache_mode", 0, "images are read from disk on every access; drop the flag"),
    ]:
        parser.add_argument(flag, action=Unsupported, nargs=nargs, reason=reason)


# ----------------------------------------------------------------------------- value ranges
# Flag types that refuse out-of-range values when the flag is parsed: argparse reports
# "argument --X: <message>".

def _number(kind, text):
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _ranged(kind, low, high=None, low_open=False, high_open=False, what=None, outside=None):
    """A flag type: kind(text) within [low, high] (open ends as flagged), else argparse's error
    'must be <what>'. outside: a value it refuses (for the tests)."""
    def parse(text):
        value = _number(kind, text)
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    parse.outside = outside
    return parse


positive_int = _ranged(int, 1, what="a positive integer", outside="0")
non_negative_int = _ranged(int, 0, what="0 or more", outside="-1")
positive_float = _ranged(float, 0, low_open=True, what="greater than 0", outside="0")
non_negative_float = _ranged(float, 0, what="0 or more", outside="-0.5")
unit_interval = _ranged(float, 0, 1, what="between 0 and 1", outside="1.5")
probability_below_1 = _ranged(float, 0, 1, high_open=True, what="at least 0 and below 1", outside="1")
seed_int = _ranged(int, 0, 2**32 - 1, what="between 0 and 2**32 - 1", outside="4294967296")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, 'error: ...', and exit status 2 (argparse's
    own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")
