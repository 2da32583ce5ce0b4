"""The ``airlock`` parser: the forms the README and docs/cli.md show parse as written."""

from __future__ import annotations

import pytest

from airlock_client._convert_cli import parse_shape
from airlock_client.cli import build_parser, join_dashed_values


@pytest.mark.parametrize("argv", [
    ["convert", "model.pt", "--to", "onnx", "--input-shape", "-1,20"],  # README's form
    ["convert", "model.pt", "--to", "onnx", "--input-shape=-1,20"],
    ["convert", "model.pt", "--input-shape", "-1,20", "--to", "onnx"],
])
def test_a_shape_with_a_free_first_dimension_parses_however_it_is_written(
        argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.input_shape == ["-1,20"] and args.target == "onnx"
    assert parse_shape(args.input_shape[0], "float32", 0).shape == (-1, 20)


def test_several_shapes_named_or_not() -> None:
    args = build_parser().parse_args(["convert", "m.pt", "--input-shape", "x:-1,3",
                                      "--input-shape", "-1,4,4", "--input-shape", "2,5"])
    assert args.input_shape == ["x:-1,3", "-1,4,4", "2,5"]


def test_only_shape_values_are_joined() -> None:
    assert join_dashed_values(["--input-shape", "--to", "onnx"]) == [
        "--input-shape", "--to", "onnx"]  # a missing value stays a usage error
    assert join_dashed_values(["--to", "-1,2"]) == ["--to", "-1,2"]
    assert join_dashed_values(["--", "--input-shape", "-1"]) == ["--", "--input-shape", "-1"]
    assert join_dashed_values(["--input-shape"]) == ["--input-shape"]


def test_a_missing_shape_is_still_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["convert", "m.pt", "--input-shape"])
    assert exit_.value.code == 2
    assert "--input-shape" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1e-4", "-1e-4", "0.5"])
def test_a_parity_tolerance_parses_even_negative_for_the_broker_to_refuse(value: str) -> None:
    args = build_parser().parse_args(
        join_dashed_values(["convert", "m.pkl", "--parity-tolerance", value]))
    assert args.parity_tolerance == float(value)
    assert build_parser().parse_args(["convert", "m.pkl"]).parity_tolerance == 0.0


def test_an_input_dtype_alone_is_kept_for_the_model_s_own_width() -> None:
    args = build_parser().parse_args(["convert", "m.pkl", "--input-dtype", "float64"])
    assert args.input_dtype == "float64" and args.input_shape == []
    assert build_parser().parse_args(["convert", "m.pkl"]).input_dtype is None
