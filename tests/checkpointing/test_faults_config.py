"""Every wrong type or value for every ``[checkpoint]`` key is a ConfigError naming the key,
from a TOML job file (``load_job_config``) and from Python (``CheckpointConfig(...)``) alike;
never a TypeError from deep inside, never a silently accepted value."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpointing import CheckpointConfig, ConfigError, load_job_config
from checkpointing.backend import loadable_specs
from tests.checkpointing.faults.config_space import (
    SPEC,
    checkpoint_toml,
    config_keys,
    toml_value,
    wrong_python_values,
    wrong_values,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # tyro warns about each wrong-typed TOML value

KEYS = sorted(SPEC)
TABLES = {spec.name: spec.options for spec in loadable_specs() if spec.options is not None}  # plugins' too
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_spec_covers_every_checkpoint_key():
    assert sorted(config_keys(CheckpointConfig)) == KEYS, "a [checkpoint] key has no entry in faults/config_space.SPEC"


def _direct(key: str, value):
    table, _, leaf = key.rpartition(".")
    if table:
        return CheckpointConfig(**{table: dataclasses.replace(TABLES[table](), **{leaf: value})})
    return CheckpointConfig(**{key: value})


def _assert_names_key(err: ConfigError, key: str, value) -> None:
    assert f"checkpoint.{key}" in str(err), f"the error for {key} = {value!r} does not name the key: {err}"


def _refused_from_toml(tmp_path, key: str, value) -> None:
    path = tmp_path / "job.toml"
    path.write_text(checkpoint_toml(key, value))
    with pytest.raises(ConfigError) as info:
        load_job_config(path)
    _assert_names_key(info.value, key, value)


def _refused_from_python(key: str, value) -> None:
    with pytest.raises(ConfigError) as info:
        _direct(key, value)
    _assert_names_key(info.value, key, value)


@pytest.mark.parametrize("key", KEYS)
def test_each_key_refuses_a_wrong_type_from_toml(key, tmp_path):
    """One deterministic wrong type per key, so every key is covered on every run."""
    wrong = {"bool": "yes", "table": 3}.get(SPEC[key].kind, [1.5])
    _refused_from_toml(tmp_path, key, wrong)


@HYPOTHESIS
@given(data=st.data())
def test_wrong_values_from_toml_are_config_errors(data, tmp_path):
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(wrong_values(SPEC[key]), label="value")
    _refused_from_toml(tmp_path, key, value)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_wrong_values_from_python_are_config_errors(data):
    key = data.draw(st.sampled_from(KEYS), label="key")
    value = data.draw(wrong_python_values(SPEC[key]), label="value")
    _refused_from_python(key, value)


@pytest.mark.parametrize("key", [k for k in KEYS if SPEC[k].kind in ("int", "float")])
def test_int_keys_refuse_out_of_range_values_from_both_sides(key, tmp_path):
    spec = SPEC[key]
    worst = next(v for v in (0, -1, -2, 1, -(2**63)) if not spec.valid_int(v))
    _refused_from_toml(tmp_path, key, worst)
    _refused_from_python(key, worst)


def test_bad_command_line_override_names_the_key():
    with pytest.raises(ConfigError) as info:
        load_job_config(None, ["--checkpoint.interval=often"])
    assert "checkpoint.interval" in str(info.value)


def test_toml_text_round_trips_the_generated_values():
    """The generator itself: what it writes is what tomllib reads back (else a failure above
    could be a test bug rather than a config bug)."""
    import tomllib

    for value in (True, -(2**63), 1.5, float("inf"), "a\"b\\c\u00e9\U0001F600\x00", [1, "x"], {"a": 1}):
        text = f"v = {toml_value(value)}\n"
        assert tomllib.loads(text)["v"] == value, text
