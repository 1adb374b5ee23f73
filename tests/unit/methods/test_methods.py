"""The method grammar ``name[:option=value,...]`` as a library module (``duogard.methods``,
issue 25): what it reads, how it fails, and the command line's deprecated old names."""

from __future__ import annotations

import argparse

import pytest

import duogard as dg
from duogard import methods
from duogard.methods import DEFAULT_METHODS, LEARNING_RATES, MethodError, MethodSpec, default_lr, parse_method

OLD_NAMES = ("MethodSpec", "parse_method", "parse_methods", "DEFAULT_METHODS", "LEARNING_RATES", "default_lr")


def test_the_grammar_still_reads_true_and_false():
    assert parse_method("forward:lean=false").estimator.lean is False
    assert parse_method("forward:orthogonal=true").estimator.orthogonal is True
    assert parse_method("forward-activity:layerwise=no").estimator.layerwise is False


def test_a_method_reads_its_options_and_its_own_learning_rate():
    spec = parse_method("forward:num_tangents=4,distribution=rademacher,lr=0.03")
    assert isinstance(spec, MethodSpec) and spec.name == "forward" and spec.lr == 0.03
    assert spec.options == (("num_tangents", 4), ("distribution", "rademacher"))
    assert spec.label == "forward(num_tangents=4,distribution=rademacher)"
    assert spec.learning_rate("cnn") == 0.03
    assert (
        parse_method("forward").learning_rate("cnn")
        == default_lr("cnn", "forward")
        == LEARNING_RATES["cnn"]["forward"]
    )
    assert [s.label for s in methods.parse_methods(None)] == [parse_method(m).label for m in DEFAULT_METHODS]


@pytest.mark.parametrize("text, flag, message", [
    ("forward:k=2", "--grad", "--grad: 'forward' has no option 'k'"),
    ("forward:num_tangents=x", "grad", "grad: option num_tangents of 'forward' must be an int, got 'x'"),
    ("backprop:lr=-1", "--methods", "--methods: option lr must be > 0"),
    (":lr=1", "--grad", "--grad: a method name is missing before ':'"),
    ("nope", "--grad", "--grad: .*unknown gradient method 'nope'"),
])  # fmt: skip
def test_a_method_written_wrongly_is_a_method_error_naming_its_flag(text, flag, message):
    """A MethodError is a ValueError (callers that caught ValueError still do)."""
    with pytest.raises(MethodError, match=message) as info:
        parse_method(text, flag=flag)
    assert isinstance(info.value, ValueError)
    with pytest.raises(MethodError, match="--methods: expected one or more methods"):
        methods.parse_methods(" ; ")


def test_the_command_reports_a_method_error_as_a_usage_error(capsys):
    """The library raises MethodError, not the command's UsageError; the command still exits 2
    with the message alone."""
    from duogard.cli import report_errors

    def run(args):
        parse_method("forward:k=2", flag="--grad")

    assert report_errors("train", run, argparse.Namespace(debug=False)) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("duogard train: error: --grad: 'forward' has no option 'k'")
    )


@pytest.mark.parametrize("name", OLD_NAMES)
def test_the_command_lines_old_names_are_deprecated_aliases(name):
    """``duogard.cli.parse_method`` and the grammar's other names moved to ``duogard.methods``;
    the old names still work for one release, with a DeprecationWarning naming the new place."""
    import duogard.cli as cli

    with pytest.warns(
        DeprecationWarning, match=rf"duogard\.cli\.{name} is deprecated.*duogard\.methods\.{name}"
    ):
        old = getattr(cli, name)
    assert old is getattr(methods, name)
    assert name not in cli.__all__  # `from duogard.cli import *` does not warn


def test_the_grammar_is_the_librarys():
    assert dg.methods is methods and set(OLD_NAMES) | {"MethodError"} == set(methods.__all__)
    assert parse_method.__module__ == "duogard.methods"
