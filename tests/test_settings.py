import pytest

from llmlab.core import settings
from llmlab.core.errors import TemplateError, UsageError


@pytest.mark.parametrize(
    "flags, error",
    [
        ({"temperature": -0.1}, "invalid --temperature -0.1: must be 0 (greedy) or >= 0.01"),
        ({"top_p": 0.0}, "invalid --top-p 0.0: must be in (0, 1]"),
        ({"top_p": 1.5}, "invalid --top-p 1.5: must be in (0, 1]"),
        ({"top_k": -1}, "invalid --top-k -1: must be an integer >= 0"),
        ({"max_new_tokens": 0}, "invalid --max-new-tokens 0: must be an integer >= 1"),
        ({"repetition_penalty": 0.0}, "invalid --repetition-penalty 0.0: must be > 0"),
        ({"num_beams": 0}, "invalid --num-beams 0: must be an integer >= 1"),
        ({"seed": -3}, "invalid --seed -3: must be an integer from 0 to 9223372036854775807"),
        ({"num_return_sequences": 2}, "--num-return-sequences 2 needs --sample or --num-beams >= 2"),
    ],
)
def test_invalid_values_are_rejected(flags, error):
    with pytest.raises(UsageError) as exc:
        settings.build(flags)
    assert error in str(exc.value)


@pytest.mark.parametrize(
    "flags, do_sample",
    [
        ({}, False),
        ({"temperature": 0.7}, True),
        ({"top_p": 0.9}, True),
        ({"top_k": 20}, True),
        ({"temperature": 0.0, "do_sample": True}, False),  # temperature 0 means greedy
        ({"temperature": 0.7, "do_sample": False}, False),  # an explicit --greedy wins
    ],
)
def test_sampling_is_implied_by_sampling_knobs(flags, do_sample):
    assert settings.build(flags).do_sample is do_sample


def test_greedy_kwargs_carry_no_sampling_knobs():
    kwargs = settings.build({"temperature": 0.0}).generate_kwargs()
    assert kwargs == {"max_new_tokens": 64, "do_sample": False, "num_beams": 1,
                      "num_return_sequences": 1, "repetition_penalty": 1.0}
    sampled = settings.build({"temperature": 0.5, "top_k": 0}).generate_kwargs()
    assert sampled["temperature"] == 0.5 and sampled["top_k"] is None and sampled["top_p"] == 1.0


def test_preset_is_overridden_by_flags(tmp_path):
    preset = tmp_path / "gen.yaml"
    preset.write_text("max-new-tokens: 12\ntemperature: 0.5\nstop: '###'\ngreedy: false\n")
    layer = settings.load_preset(preset)
    result = settings.build(layer, {"max_new_tokens": 30, "temperature": None})
    assert (result.max_new_tokens, result.temperature, result.stop, result.do_sample) == (30, 0.5, ["###"], True)


def test_preset_unknown_key(tmp_path):
    preset = tmp_path / "gen.yaml"
    preset.write_text("temprature: 0.5\n")
    with pytest.raises(UsageError, match="unknown generation setting 'temprature'"):
        settings.load_preset(preset)


def test_preset_yaml_error_names_the_line(tmp_path):
    preset = tmp_path / "gen.yaml"
    preset.write_text("max_new_tokens: 5\ntemperature: [0.5\n")
    with pytest.raises(TemplateError, match=r"gen.yaml line 3, column 1: invalid YAML"):
        settings.load_preset(preset)
