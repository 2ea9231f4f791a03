"""shared.settings: every setting of every CLI is a flag and a LINEPACK_* variable, both parsed
and checked the same way, and launchers reproduce a config from its argv."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from producer.prepare import PrepareSettings
from producer.replay import ReplaySettings
from producer.sending import SenderSettings
from producer.service import RunSettings
from producer.tokenizer_cli import TokenizerTrainSettings
from shared import settings
from shared.data_config import DataConfig
from shared.settings import env_name, flag_name, iter_settings, setting
from trainer.compare import CompareSettings
from trainer.consume import ConsumeSettings
from trainer.data.config import StreamSettings
from trainer.diagnostics.config import DiagnosticsSettings
from trainer.loop.config import TrainConfig
from trainer.model.transformer import ModelConfig
from trainer.sample import SampleSettings
from trainer.stack import StackSettings

CLASSES = [DataConfig, SenderSettings, RunSettings, ReplaySettings, StreamSettings, TrainConfig, ModelConfig,
           DiagnosticsSettings, StackSettings, CompareSettings, ConsumeSettings, PrepareSettings, TokenizerTrainSettings,
           SampleSettings]
TUPLE_SAMPLES = {"ratio_range": ((0.2, 0.4), "0.2,0.4"), "mask_fractions": ((1.0, 0.0, 0.0), "1,0,0"),
                 "connect": (("tcp://a:1", "tcp://b:2"), "tcp://a:1,tcp://b:2"), "producer_args": (("--x 1",), "--x 1"),
                 "trainer_args": (("--y 2",), "--y 2"), "corpus": (("code=x:0.5",), "code=x:0.5")}


def sample(cls: type, field: dataclasses.Field) -> tuple[typing.Any, str]:
    """A valid value of ``field`` other than its default, and its text."""
    meta = field.metadata["setting"]
    kind = typing.get_type_hints(cls)[field.name]
    if field.name in TUPLE_SAMPLES and typing.get_origin(kind) is tuple:
        return TUPLE_SAMPLES[field.name]
    if field.name in ("connect", "bind"):  # checked as ZeroMQ endpoints (shared.endpoints)
        return "tcp://x:1", "tcp://x:1"
    if meta["choices"] is not None:
        value = next(choice for choice in reversed(meta["choices"]) if choice != field.default)
        return value, str(value)
    if kind is bool:
        return (not field.default), "true" if not field.default else "false"
    if int in typing.get_args(kind) or kind is int:
        value = field.default + 1 if isinstance(field.default, int) and field.default > 3 else 3
        return value, str(value)
    if float in typing.get_args(kind) or kind is float:
        return 0.5, "0.5"
    return "x", "x"


def parser_for(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    settings.add_arguments(parser, cls)
    return parser


def setting_id(value) -> str:
    """A test id: the field's name, or the settings class's."""
    return getattr(value, "name", getattr(value, "__name__", ""))


@pytest.mark.parametrize("cls,field", list(iter_settings(*CLASSES)), ids=setting_id)
def test_every_setting_is_a_flag_and_a_variable(cls, field, monkeypatch):
    value, text = sample(cls, field)
    monkeypatch.setenv(env_name(field.name), text)
    assert getattr(parser_for(cls).parse_args([]), field.name) == value, "from the variable"
    monkeypatch.delenv(env_name(field.name))
    assert getattr(parser_for(cls).parse_args([]), field.name) == field.default, "the default"
    kind = typing.get_type_hints(cls)[field.name]
    argv = [flag_name(field)] if kind is bool else [flag_name(field), text]
    assert getattr(parser_for(cls).parse_args(argv), field.name) == value, "from the flag"
    assert env_name(field.name) in parser_for(cls).format_help().replace("\n", " ").replace("  ", " ")


def test_a_flag_wins_over_its_variable_and_empty_means_unset(monkeypatch):
    monkeypatch.setenv("LINEPACK_BLOCK_SIZE", "256")
    assert parser_for(DataConfig).parse_args(["--block-size", "64"]).block_size == 64
    monkeypatch.setenv("LINEPACK_BLOCK_SIZE", "")
    assert parser_for(DataConfig).parse_args([]).block_size == DataConfig().block_size


def test_a_bad_variable_is_a_usage_error_naming_it(monkeypatch, capsys):
    monkeypatch.setenv("LINEPACK_BLOCK_SIZE", "1")
    with pytest.raises(SystemExit) as stopped:
        parser_for(DataConfig)
    assert stopped.value.code == 2
    assert "LINEPACK_BLOCK_SIZE='1': block size 1 is outside" in capsys.readouterr().err
    monkeypatch.setenv("LINEPACK_BLOCK_SIZE", "128")
    monkeypatch.setenv("LINEPACK_PACKING", "words")
    with pytest.raises(SystemExit):
        parser_for(DataConfig)
    assert "is not one of lines, fixed" in capsys.readouterr().err


def test_a_bad_flag_is_a_usage_error_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        parser_for(DataConfig).parse_args(["--mask-fractions", "0.8,0.1,0.2"])
    assert "argument --mask-fractions: mask fractions" in capsys.readouterr().err


def test_to_argv_reproduces_a_config():
    config = DataConfig(block_size=64, policy="uniform", ratio_range=(0.1, 0.9), supervise_sep=True, seed=7)
    parsed = settings.from_namespace(DataConfig, parser_for(DataConfig).parse_args(settings.to_argv(config)))
    assert parsed == config
    assert settings.to_argv(config, changed_only=True) == [
        "--block-size", "64", "--policy", "uniform", "--ratio-range", "0.1,0.9", "--supervise-sep", "--seed", "7"]
    model = ModelConfig(bias=False, n_layer=2)
    assert settings.to_argv(model, changed_only=True) == ["--n-layer", "2", "--no-bias"]


def test_many_collects_repeated_and_comma_separated_values():
    parser = parser_for(SenderSettings)
    assert parser.parse_args(["--connect", "tcp://a:1,tcp://b:2", "--connect", "tcp://c:3"]).connect == (
        "tcp://a:1", "tcp://b:2", "tcp://c:3")
    assert parser_for(StackSettings).parse_args(["--trainer-args", "--a 1,2", "--trainer-args=--b"]).trainer_args == (
        "--a 1,2", "--b")


def test_checks_run_for_configs_built_in_code_too():
    with pytest.raises(ValueError, match="block size 1"):
        DataConfig(block_size=1)
    with pytest.raises(ValueError, match="exactly one of --connect"):
        SenderSettings()


def test_a_setting_declares_what_it_needs():
    @dataclasses.dataclass(frozen=True)
    class Example:
        count: int = setting(2, "how many", metavar="N")

    help_text = parser_for(Example).format_help()
    assert "--count N" in help_text and "how many (default: 2; env LINEPACK_COUNT)" in help_text
