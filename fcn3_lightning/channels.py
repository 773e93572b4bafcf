"""Channel catalogue: FCN3's prognostic and auxiliary channels and how a channel list is grouped.

A channel is named the reference way: a level channel is a variable prefix followed by its pressure
level in hPa (``z500``), a surface channel has its own name (``t2m``, ``msl``). Each maps to a
WeatherBench2 long name (and level), which is how the data code finds it in a Zarr store.

Any channel list works, not only FCN3's 72: the model needs only that every pressure level holds
the same variables in the same order, because one encoder is shared across levels.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: FCN3 pressure levels in hPa, top of the atmosphere first (the reference order).
FCN3_LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
FCN3_SURFACE: tuple[str, ...] = ("u10m", "v10m", "u100m", "v100m", "t2m", "msl", "tcwv")
FCN3_LEVEL_VARIABLES: tuple[str, ...] = ("u", "v", "z", "t", "q")

#: The 72 prognostic channels of FCN3 in the reference order.
FCN3_CHANNELS: tuple[str, ...] = FCN3_SURFACE + tuple(f"{v}{p}" for v in FCN3_LEVEL_VARIABLES for p in FCN3_LEVELS)

#: The 12 auxiliary input channels in the reference order (cos zenith, 8 noise, orography, lsm one-hot).
FCN3_AUX_CHANNELS: tuple[str, ...] = ("xzen", *(f"xnoise{i}" for i in range(8)), "xoro", "xlsml", "xlsms")

#: The auxiliary channels made from static fields (orography, land-sea mask one-hot): :mod:`fcn3_lightning.data.statics`.
STATIC_AUX: tuple[str, ...] = ("xoro", "xlsml", "xlsms")

# short surface name -> WeatherBench2 long name
SURFACE_VARIABLES: dict[str, str] = {
    "u10m": "10m_u_component_of_wind",
    "v10m": "10m_v_component_of_wind",
    "u100m": "100m_u_component_of_wind",
    "v100m": "100m_v_component_of_wind",
    "t2m": "2m_temperature",
    "d2m": "2m_dewpoint_temperature",
    "msl": "mean_sea_level_pressure",
    "sp": "surface_pressure",
    "tcwv": "total_column_water_vapour",
    "sst": "sea_surface_temperature",
    "tp": "total_precipitation",
    "tp6": "total_precipitation_6hr",
}

# level-variable prefix -> WeatherBench2 long name
LEVEL_VARIABLES: dict[str, str] = {
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "z": "geopotential",
    "t": "temperature",
    "q": "specific_humidity",
    "r": "relative_humidity",
    "w": "vertical_velocity",
}

# auxiliary (input-only) channels and what they are
AUX_VARIABLES: dict[str, str] = {
    "xzen": "cosine of the solar zenith angle at the valid time",
    "xnoise": "latent noise channel (spherical diffusion process)",
    "xoro": "orography (surface geopotential), standardised",
    "xlsml": "land-sea mask one-hot: 1 where lsm < 1",
    "xlsms": "land-sea mask one-hot: 1 where lsm == 1",
}

#: Units of the WeatherBench2 variables (ERA5's conventions, as the WB2 archives write them): the one table of units.
#: ``predict`` writes them into forecast stores whose data lack them; the leaderboard shows them (:func:`display_units`).
WB2_UNITS: dict[str, str] = {
    "geopotential": "m**2 s**-2",
    "temperature": "K",
    "u_component_of_wind": "m s**-1",
    "v_component_of_wind": "m s**-1",
    "wind_vector": "m s**-1",
    "wind_speed": "m s**-1",
    "specific_humidity": "kg kg**-1",
    "relative_humidity": "%",
    "vertical_velocity": "Pa s**-1",
    "10m_u_component_of_wind": "m s**-1",
    "10m_v_component_of_wind": "m s**-1",
    "10m_wind_speed": "m s**-1",
    "10m_wind_vector": "m s**-1",
    "100m_u_component_of_wind": "m s**-1",
    "100m_v_component_of_wind": "m s**-1",
    "2m_temperature": "K",
    "2m_dewpoint_temperature": "K",
    "mean_sea_level_pressure": "Pa",
    "surface_pressure": "Pa",
    "total_column_water_vapour": "kg m**-2",
    "sea_surface_temperature": "K",
    "total_precipitation": "m",
    "total_precipitation_6hr": "m",
    "total_precipitation_24hr": "m",
    "geopotential_at_surface": "m**2 s**-2",
    "land_sea_mask": "1",
}

_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def display_units(units: str, *, mathtext: bool = False) -> str:
    """Units for people to read: ERA5's ``m**2 s**-2`` as ``m\u00b2 s\u207b\u00b2`` (tables), or with ``mathtext`` as
    ``m$^{2}$ s$^{-2}$`` (matplotlib axis labels)."""
    if mathtext:
        return re.sub(r"\*\*(-?[0-9]+)", r"$^{\1}$", units)
    return re.sub(r"\*\*(-?[0-9]+)", lambda m: m.group(1).translate(_SUPERSCRIPT), units)


#: Short names of WB2 variables in the evaluation's tables and plots (leaderboard, scorecard): ``z500``, ``u10``,
#: ``tp6h``. A vocabulary of its own, on purpose apart from the channel names of this catalogue (``u10m``, ``tp6``:
#: the FCN3 reference's names, which checkpoints and configs carry): the evaluation scores any WB2 store, including
#: derived variables that are no channel (``ws10``, ``wv850``). Both map to the same WB2 long names.
WB2_SHORT_NAMES: dict[str, str] = {
    "geopotential": "z",
    "temperature": "t",
    "specific_humidity": "q",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "wind_vector": "wv",
    "wind_speed": "ws",
    "vertical_velocity": "w",
    "relative_humidity": "r",
    "2m_temperature": "t2m",
    "2m_dewpoint_temperature": "d2m",
    "10m_u_component_of_wind": "u10",
    "10m_v_component_of_wind": "v10",
    "10m_wind_speed": "ws10",
    "10m_wind_vector": "wv10",
    "100m_u_component_of_wind": "u100",
    "100m_v_component_of_wind": "v100",
    "mean_sea_level_pressure": "msl",
    "surface_pressure": "sp",
    "total_column_water_vapour": "tcwv",
    "total_precipitation_6hr": "tp6h",
    "total_precipitation_24hr": "tp24h",
    "sea_surface_temperature": "sst",
}

#: WeatherBench2's headline variables, in the leaderboard's order: short name -> (WB2 variable, level in hPa or None).
WB2_HEADLINE: dict[str, tuple[str, float | None]] = {
    "z500": ("geopotential", 500.0),
    "t850": ("temperature", 850.0),
    "q700": ("specific_humidity", 700.0),
    "wv850": ("wind_vector", 850.0),
    "t2m": ("2m_temperature", None),
    "ws10": ("10m_wind_speed", None),
    "msl": ("mean_sea_level_pressure", None),
}

#: The headline variables as channels of this catalogue (the winds as their components, u10m for the 10 m wind, and
#: tcwv): what training logs per channel when the channel list is long; the first two are the maps' default.
HEADLINE_CHANNELS: tuple[str, ...] = ("z500", "t850", "q700", "u850", "v850", "t2m", "u10m", "msl", "tcwv")

_LEVEL_RE = re.compile(r"^([a-z]{1,3})([0-9]{1,4})$")
_NOISE_RE = re.compile(r"^xnoise[0-9]+$")


def register_surface_variable(short: str, long_name: str) -> None:
    """Add a surface (single-level) variable to the catalogue, e.g. for a non-ERA5 dataset."""
    if _LEVEL_RE.match(short):
        raise ValueError(f"surface variable name {short!r} looks like a level channel (prefix + hPa); pick another name")
    SURFACE_VARIABLES[short] = long_name


def register_level_variable(prefix: str, long_name: str) -> None:
    """Add a pressure-level variable prefix (channels are then ``<prefix><hPa>``)."""
    if not re.fullmatch(r"[a-z]{1,3}", prefix):
        raise ValueError(f"level variable prefix {prefix!r} must be 1-3 lower-case letters")
    LEVEL_VARIABLES[prefix] = long_name


@dataclass(frozen=True)
class Channel:
    """One prognostic channel: its short name, variable, WB2 long name and level (None on the surface)."""

    name: str
    variable: str
    long_name: str
    level: int | None

    @property
    def is_water(self) -> bool:
        """Water channels (q*, r*, tcwv) are min-max normalised and soft-clamped at 0 (reference rule)."""
        return self.variable in ("q", "r") or self.name == "tcwv"


def parse_channel(name: str) -> Channel:
    """Look a channel name up in the catalogue; unknown names raise a ``ValueError`` naming them."""
    if name in SURFACE_VARIABLES:
        return Channel(name, name, SURFACE_VARIABLES[name], None)
    m = _LEVEL_RE.match(name)
    if m and m.group(1) in LEVEL_VARIABLES:
        return Channel(name, m.group(1), LEVEL_VARIABLES[m.group(1)], int(m.group(2)))
    raise ValueError(
        f"unknown channel {name!r}: not a surface variable ({', '.join(sorted(SURFACE_VARIABLES))}) and not "
        f"<level variable><hPa> with a level variable in ({', '.join(sorted(LEVEL_VARIABLES))}); "
        "register new variables with fcn3_lightning.channels.register_surface_variable/register_level_variable"
    )


def check_aux_channels(names: Sequence[str]) -> list[str]:
    """Validate auxiliary channel names; returns the noise channel names in order."""
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate auxiliary channel names in {list(names)}")
    noise = []
    for n in names:
        if _NOISE_RE.match(n):
            noise.append(n)
        elif n not in AUX_VARIABLES:
            raise ValueError(f"unknown auxiliary channel {n!r}; known: {', '.join(sorted(AUX_VARIABLES))} and xnoise<i>")
    return noise


@dataclass(frozen=True)
class ChannelLayout:
    """How a channel list splits into the model's level groups and surface channels.

    ``level_index`` lists channel indices level by level (levels in order of first appearance,
    variables in channel-list order inside a level): reshaping the gathered channels to
    ``(B, n_levels, n_level_vars, ...)`` gives the grouped layout the shared level encoder needs.
    """

    channels: tuple[Channel, ...]
    levels: tuple[int, ...]
    level_variables: tuple[str, ...]
    level_index: tuple[int, ...]
    surface_index: tuple[int, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def surface_names(self) -> tuple[str, ...]:
        return tuple(self.channels[i].name for i in self.surface_index)

    def water_index(self, water_channels: Sequence[str] | None = None) -> tuple[int, ...]:
        """Indices of the water channels: the reference rule, or an explicit list of names."""
        if water_channels is None:
            return tuple(i for i, c in enumerate(self.channels) if c.is_water)
        missing = [w for w in water_channels if w not in self.names]
        if missing:
            raise ValueError(f"water_channels {missing} are not in the channel list")
        return tuple(self.names.index(w) for w in water_channels)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"channel {name!r} is not in the channel list {list(self.names)}")
        return self.names.index(name)


def channel_layout(names: Sequence[str]) -> ChannelLayout:
    """Parse and group a channel list; raises ``ValueError`` naming what is wrong."""
    names = list(names)
    if not names:
        raise ValueError("the channel list is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate channel names: {dupes}")
    channels = tuple(parse_channel(n) for n in names)

    groups: dict[int, list[int]] = {}
    surface: list[int] = []
    for i, c in enumerate(channels):
        if c.level is None:
            surface.append(i)
        else:
            groups.setdefault(c.level, []).append(i)

    level_vars: tuple[str, ...] = ()
    if groups:
        per_level = {lev: tuple(channels[i].variable for i in idx) for lev, idx in groups.items()}
        level_vars = next(iter(per_level.values()))
        for lev, vs in per_level.items():
            if vs != level_vars:
                first = next(iter(per_level))
                raise ValueError(
                    f"every pressure level must hold the same variables in the same order (one encoder is shared "
                    f"across levels): level {first} has {list(level_vars)}, level {lev} has {list(vs)}"
                )
    level_index = tuple(i for idx in groups.values() for i in idx)
    return ChannelLayout(channels, tuple(groups), level_vars, level_index, tuple(surface))
