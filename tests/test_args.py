"""util/args.py on a toy parser: family-dependent defaults whatever the order of the flags,
through a child parser, across reuses of one parser, for every kind of flag; unsupported flags."""
import argparse

import pytest

from util.args import SelectFamily, Unsupported, set_family_defaults


def toy_parser():
    parser = argparse.ArgumentParser(add_help=False)
    family = parser.add_argument("--model", action=SelectFamily, default="a", choices=("a", "b", "c"))
    parser.add_argument("--n", default=6, type=int, help="layers")
    parser.add_argument("--name", default="x")
    parser.add_argument("--names", default=["p"], nargs="+")
    parser.add_argument("--ema", action="store_true")
    parser.add_argument("--no_ema", dest="ema", action="store_false")
    parser.add_argument("--plain", default=1.5, type=float)
    parser.add_argument("--old", action=Unsupported, nargs=0, reason="gone; drop the flag")
    set_family_defaults(parser, family, {"a": {}, "b": {"n": 1, "name": "y", "names": ["q", "r"], "ema": True},
                                         "c": {"n": 200}})
    return parser


def child():
    return argparse.ArgumentParser(parents=[toy_parser()])


@pytest.mark.parametrize("make", [toy_parser, child])
def test_defaults_follow_the_family(make):
    parser = make()
    a = parser.parse_args([])
    assert (a.model, a.n, a.name, a.names, a.ema, a.plain) == ("a", 6, "x", ["p"], False, 1.5)
    assert [type(v) for v in (a.n, a.name, a.ema)] == [int, str, bool]  # no placeholder survives
    b = parser.parse_args(["--model", "b"])
    assert (b.n, b.name, b.names, b.ema, b.plain) == (1, "y", ["q", "r"], True, 1.5)
    assert parser.parse_args(["--model", "c"]).n == 200
    assert parser.parse_args(["--model", "a"]).n == 6


@pytest.mark.parametrize("flags", [["--n", "6", "--no_ema", "--names", "z", "--model", "b"],
                                   ["--model", "b", "--n", "6", "--no_ema", "--names", "z"]])
def test_given_flags_win_in_any_order(flags):
    # 6 and False equal family a's defaults: what counts is that they were given.
    args = child().parse_args(flags)
    assert (args.n, args.ema, args.names, args.name) == (6, False, ["z"], "y")


def test_reusing_a_parser_and_mutable_defaults_leak_nothing():
    parser = child()
    b = parser.parse_args(["--model", "b"])
    b.names.append("changed")
    assert parser.parse_args(["--model", "b"]).names == ["q", "r"]
    a = parser.parse_args([])
    a.names.append("changed")
    assert parser.parse_args([]).names == ["p"] and parser.parse_args([]).n == 6


def test_bad_values_still_get_argparse_messages(capsys):
    with pytest.raises(SystemExit):
        child().parse_args(["--n", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_help_lists_the_families_that_differ():
    text = " ".join(toy_parser().format_help().split())
    assert "layers (default 6; b: 1, c: 200)" in text
    assert "default p; b: q r" in text


def test_unsupported_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        child().parse_args(["--old"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --old is not supported by dap-detr: gone; drop the flag\n"
    assert not hasattr(child().parse_args([]), "old")


def test_a_family_default_for_no_flag_is_a_programming_error():
    parser = argparse.ArgumentParser()
    family = parser.add_argument("--model", action=SelectFamily, default="a")
    with pytest.raises(ValueError, match="nope"):
        set_family_defaults(parser, family, {"a": {"nope": 1}})
