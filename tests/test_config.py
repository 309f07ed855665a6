import pytest

from liger_fx.config import LigerConfig, split_options


def test_defaults_are_ligers():
    c = LigerConfig()
    assert (c.rms_norm, c.rope, c.swiglu, c.geglu, c.fused_linear_cross_entropy) == (True,) * 5
    assert c.fused_linear_logprobs is True and "fused_linear_logprobs" in LigerConfig.flag_names()
    assert c.cross_entropy is False


def test_unknown_key_is_named_with_valid_ones():
    with pytest.raises(ValueError, match=r"'rms_nrom'.*rms_norm, rope"):
        LigerConfig.from_options({"rms_nrom": False})


@pytest.mark.parametrize("value", [1, "yes", None, 0.0])
def test_non_bool_value_is_named(value):
    with pytest.raises(ValueError, match=r"'rope' must be True or False"):
        LigerConfig.from_options({"rope": value})


def test_both_cross_entropy_flags_are_allowed_with_flce_first():
    c = LigerConfig.from_options({"cross_entropy": True, "fused_linear_cross_entropy": True})
    assert c.cross_entropy and c.fused_linear_cross_entropy


def test_inductor_keys_pass_through_and_others_raise():
    config, inductor = split_options({"rope": False, "max_autotune": True, "triton.cudagraphs": False})
    assert config.rope is False and inductor == {"max_autotune": True, "triton.cudagraphs": False}
    with pytest.raises(ValueError, match="'not_a_thing'"):
        split_options({"not_a_thing": True})


def test_frozen():
    with pytest.raises(Exception):
        LigerConfig().rope = False
