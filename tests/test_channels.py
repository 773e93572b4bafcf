"""The channel catalogue: FCN3's order, WB2 names, grouping of any channel list."""

import pytest

from fcn3_lightning.channels import (
    FCN3_AUX_CHANNELS,
    FCN3_CHANNELS,
    channel_layout,
    check_aux_channels,
    parse_channel,
    register_surface_variable,
)


def test_fcn3_channel_list_matches_reference_order(manifest):
    assert len(FCN3_CHANNELS) == 72
    assert list(FCN3_CHANNELS) == manifest["config"]["channel_names"]
    assert list(FCN3_AUX_CHANNELS) == manifest["config"]["aux_channel_names"]


def test_wb2_names_and_levels():
    assert parse_channel("z500").long_name == "geopotential" and parse_channel("z500").level == 500
    assert parse_channel("u10m").long_name == "10m_u_component_of_wind" and parse_channel("u10m").level is None
    assert parse_channel("tcwv").long_name == "total_column_water_vapour"
    assert parse_channel("q1000").is_water and parse_channel("tcwv").is_water and not parse_channel("t2m").is_water


def test_fcn3_layout_groups_levels_in_reference_order():
    lay = channel_layout(FCN3_CHANNELS)
    assert lay.levels == (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
    assert lay.level_variables == ("u", "v", "z", "t", "q")
    assert lay.surface_names == ("u10m", "v10m", "u100m", "v100m", "t2m", "msl", "tcwv")
    # first level group is [u50, v50, z50, t50, q50], then level 100 ...
    assert [FCN3_CHANNELS[i] for i in lay.level_index[:10]] == ["u50", "v50", "z50", "t50", "q50", "u100", "v100", "z100", "t100", "q100"]
    assert len(lay.water_index()) == 14


def test_other_channel_lists():
    lay = channel_layout(["z500", "t500", "z850", "t850", "t2m"])
    assert lay.levels == (500, 850) and lay.level_variables == ("z", "t") and lay.surface_names == ("t2m",)
    assert channel_layout(["t2m", "msl"]).levels == ()


def test_bad_channel_lists_are_named():
    with pytest.raises(ValueError, match="unknown channel 'foo500'"):
        channel_layout(["z500", "foo500"])
    with pytest.raises(ValueError, match="level 850 has"):
        channel_layout(["z500", "t500", "z850"])
    with pytest.raises(ValueError, match="duplicate channel names"):
        channel_layout(["z500", "z500"])
    with pytest.raises(ValueError, match="unknown auxiliary channel 'xfoo'"):
        check_aux_channels(["xzen", "xfoo"])


def test_register_new_surface_variable():
    register_surface_variable("swh", "significant_height_of_combined_wind_waves_and_swell")
    assert parse_channel("swh").long_name.startswith("significant_height")
    with pytest.raises(ValueError, match="looks like a level channel"):
        register_surface_variable("h500", "nope")


def test_units_have_one_table_written_by_predict_and_shown_by_the_leaderboard():
    from fcn3_lightning.eval.leaderboard import unit_of

    from fcn3_lightning.channels import WB2_UNITS, display_units

    assert display_units("m**2 s**-2") == "m\u00b2 s\u207b\u00b2" and display_units("kg m**-2") == "kg m\u207b\u00b2"
    assert unit_of("geopotential") == "m\u00b2 s\u207b\u00b2" and unit_of("10m_wind_speed") == "m s\u207b\u00b9"
    assert unit_of("not_a_wb2_variable") == ""
    # every variable of FCN3's channels has its unit, so predict can label the stores it writes
    assert not [c for c in (*FCN3_CHANNELS, "d2m", "sp", "sst", "tp", "tp6", "r500", "w500") if parse_channel(c).long_name not in WB2_UNITS]


def test_channel_names_and_wb2_short_names_are_two_vocabularies_of_the_same_long_names():
    from fcn3_lightning.eval.leaderboard import variable_key

    from fcn3_lightning.channels import WB2_SHORT_NAMES

    # the FCN3 reference's channel names (u10m, tp6) and the evaluation's WB2 short names (u10, tp6h) differ on purpose
    for channel, short in (("u10m", "u10"), ("v100m", "v100"), ("tp6", "tp6h"), ("t2m", "t2m"), ("z500", "z500")):
        c = parse_channel(channel)
        assert variable_key(c.long_name, None if c.level is None else float(c.level)) == short
    assert WB2_SHORT_NAMES["total_precipitation_6hr"] == "tp6h"
