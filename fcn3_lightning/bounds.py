"""Physical bounds of a forecast: where it leaves the climate its model knows, found and said once per channel.

A forecast leaves its bounds in a channel when

* a value is not finite (NaN or inf);
* a grid-point value lies outside the reference range widened by half of it on either side,
  ``[min - 0.5 (max - min), max + 0.5 (max - min)]`` (:data:`POINT_MARGIN`);
* the global (area-weighted) mean of a member lies more than half a reference standard deviation from the
  reference mean, ``mean ± 0.5 std`` (:data:`MEAN_MARGIN`).

The reference: in ``predict`` the normalisation statistics of the training data (``*.stats.json``: min, max,
area-weighted mean and standard deviation over the training period); in ``evaluate`` the same statistics of the
truth at the scored valid times.

Why these bounds: they find a model that has diverged, not a forecast that is merely poor. A global mean moves
far less over the seasons than the field varies over space and time (its std): over the default world's three
years the global means of tcwv, u500 and z500 span 2.1 kg m-2, 3.1 m s-1 and 1.5 m2 s-2, while half a std is
8.8 kg m-2, 5.9 m s-1 and 1,154 m2 s-2 (on ERA5, half a std of t850 is ~7 K against a seasonal swing of the
global mean of ~3 K). A grid-point value half the reference range beyond its most extreme value is no record
but a broken model (u500 beyond -135 or 142 m s-1 in the default world). A model that stays within them may
still be poor; one that leaves them produces no weather from that lead on.

:class:`Extremes` keeps, per lead time and channel, the extreme values and global means of a forecast and where
they are (initial time, member); :meth:`Bounds.check` turns them into a :class:`Report` with, per channel, the
first lead time out of bounds and the worst excursion. ``predict`` checks every step as it is written and warns at
once; ``evaluate`` accumulates the blocks it scores and checks at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcn3_lightning.grid import cell_area_weights

#: pointwise bounds: the reference range widened by this fraction of it on either side
POINT_MARGIN = 0.5
#: global-mean bounds: the reference mean plus or minus this many reference standard deviations
MEAN_MARGIN = 0.5

KINDS = ("non-finite", "value", "global mean")


@dataclass(frozen=True)
class Bounds:
    """Per channel: the pointwise range ``[point_lo, point_hi]`` and the global-mean range ``[mean_lo, mean_hi]``."""

    channels: tuple[str, ...]
    point_lo: np.ndarray
    point_hi: np.ndarray
    mean_lo: np.ndarray
    mean_hi: np.ndarray
    reference: str  # what the bounds were derived from (for messages and records)

    @classmethod
    def from_moments(
        cls, channels: Sequence[str], mean: Sequence[float], std: Sequence[float], lo: Sequence[float], hi: Sequence[float], reference: str
    ) -> Bounds:
        """Bounds from a reference's per-channel area-weighted mean and std and its min and max (see the module doc)."""
        mean, std, lo, hi = (np.asarray(a, dtype=np.float64) for a in (mean, std, lo, hi))
        if not all(a.shape == (len(channels),) for a in (mean, std, lo, hi)):
            raise ValueError(f"bounds need one mean, std, min and max per channel ({len(channels)} channels)")
        span = hi - lo
        return cls(
            tuple(channels),
            lo - POINT_MARGIN * span,
            hi + POINT_MARGIN * span,
            mean - MEAN_MARGIN * std,
            mean + MEAN_MARGIN * std,
            reference,
        )

    @classmethod
    def from_stats(cls, stats: Any, channels: Sequence[str], reference: str) -> Bounds:
        """Bounds from normalisation statistics (:class:`fcn3_lightning.data.stats.ChannelStats`) of ``channels``."""
        idx = [stats.channels.index(c) for c in channels]
        pick = [[float(getattr(stats, k)[i]) for i in idx] for k in ("mean", "std", "min", "max")]
        return cls.from_moments(channels, *pick, reference=reference)

    def definition(self) -> str:
        return (
            f"non-finite values; values outside the reference range ± {POINT_MARGIN:g} of it; member global (area-weighted) "
            f"means outside the reference mean ± {MEAN_MARGIN:g} std; reference: {self.reference}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "definition": self.definition(),
            "channels": {
                c: {
                    "value": [float(self.point_lo[i]), float(self.point_hi[i])],
                    "global_mean": [float(self.mean_lo[i]), float(self.mean_hi[i])],
                }
                for i, c in enumerate(self.channels)
            },
        }

    def check(self, ext: Extremes, leads: Sequence[int] | None = None) -> Report:
        """Every channel out of bounds in ``ext`` (at the lead indices ``leads``; default: all): its first lead time out
        of bounds and its worst excursion."""
        if tuple(ext.channels) != self.channels:
            raise ValueError(f"bounds for channels {list(self.channels)} cannot check a forecast of {list(ext.channels)}")
        li = np.arange(len(ext.lead_hours)) if leads is None else np.asarray(leads, dtype=np.int64)
        report = Report()
        for a, c in np.argwhere(ext.nonfinite[li] > 0):
            init, member = ext.where("nonfinite", int(li[a]), int(c))
            e = Excursion(self.channels[c], "non-finite", ext.lead_hours[li[a]], init, member, float("nan"), (-np.inf, np.inf), np.inf)
            report.add(ChannelReport(e.channel, e, e))
        tests = (
            ("value", "lo", self.point_lo, self.point_hi),
            ("value", "hi", self.point_lo, self.point_hi),
            ("global mean", "mean_lo", self.mean_lo, self.mean_hi),
            ("global mean", "mean_hi", self.mean_lo, self.mean_hi),
        )
        for kind, key, lo, hi in tests:
            v = getattr(ext, key)[li]  # (leads, C)
            out = np.isfinite(v) & ((v < lo) | (v > hi))
            for a, c in np.argwhere(out):
                x, low, high = float(v[a, c]), float(lo[c]), float(hi[c])
                severity = (low - x if x < low else x - high) / max(high - low, 1e-30)
                init, member = ext.where(key, int(li[a]), int(c))
                e = Excursion(self.channels[c], kind, ext.lead_hours[li[a]], init, member, x, (low, high), severity)
                report.add(ChannelReport(e.channel, e, e))
        return report


@dataclass(frozen=True)
class Excursion:
    """One value (or global mean) out of bounds: where, how far (``severity``: beyond the bound, in bound widths)."""

    channel: str
    kind: str  # one of KINDS
    lead_hours: float
    init: str
    member: int | None
    value: float
    bounds: tuple[float, float]
    severity: float

    def describe(self, units: str = "", lead: bool = True) -> str:
        unit = f" {units}" if units else ""
        where = f"init {self.init}" + ("" if self.member is None else f", member {self.member}")
        if self.kind == "non-finite":
            what = "non-finite values (NaN or inf)"
        else:
            what = f"{self.kind} {_num(self.value)}{unit} outside {_num(self.bounds[0])} .. {_num(self.bounds[1])}"
        return f"{what} " + (f"at lead {lead_text(self.lead_hours)} ({where})" if lead else f"({where})")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lead_hours": self.lead_hours,
            "init": self.init,
            "member": self.member,
            "value": None if not np.isfinite(self.value) else self.value,
            "bounds": [None if not np.isfinite(b) else b for b in self.bounds],
            "severity": None if not np.isfinite(self.severity) else self.severity,
        }

    @classmethod
    def from_dict(cls, channel: str, d: Mapping[str, Any]) -> Excursion:
        def num(v: Any, default: float) -> float:
            return default if v is None else float(v)

        lo, hi = d["bounds"]
        return cls(
            channel,
            d["kind"],
            float(d["lead_hours"]),
            d["init"],
            d["member"],
            num(d["value"], float("nan")),
            (num(lo, -np.inf), num(hi, np.inf)),
            num(d["severity"], np.inf),
        )


@dataclass(frozen=True)
class ChannelReport:
    """A channel out of bounds: where it first left them (the earliest lead) and its worst excursion."""

    channel: str
    first: Excursion
    worst: Excursion

    def merge(self, other: ChannelReport) -> ChannelReport:
        a, b = self.first, other.first
        first = a if (a.lead_hours, -a.severity) <= (b.lead_hours, -b.severity) else b
        worst = self.worst if self.worst.severity >= other.worst.severity else other.worst
        return ChannelReport(self.channel, first, worst)

    def describe(self, units: str = "") -> str:
        text = f"{self.channel} from lead {lead_text(self.first.lead_hours)}: {self.first.describe(units, lead=False)}"
        w, f = self.worst, self.first
        if (w.kind, w.lead_hours, w.init, w.member) != (f.kind, f.lead_hours, f.init, f.member):
            text += f"; worst: {self.worst.describe(units)}"
        return text


@dataclass
class Report:
    """The channels out of bounds (empty: the forecast stayed within its bounds), mergeable over runs and inits."""

    channels: dict[str, ChannelReport] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.channels)

    def add(self, r: ChannelReport) -> None:
        have = self.channels.get(r.channel)
        self.channels[r.channel] = r if have is None else have.merge(r)

    def update(self, other: Report) -> None:
        for r in other.channels.values():
            self.add(r)

    def lines(self, units: Mapping[str, str] | None = None) -> list[str]:
        """One line per channel, earliest first."""
        units = units or {}
        order = sorted(self.channels.values(), key=lambda r: (r.first.lead_hours, r.channel))
        return [r.describe(units.get(r.channel, "")) for r in order]

    def as_dict(self) -> dict[str, Any]:
        return {c: {"first": r.first.as_dict(), "worst": r.worst.as_dict()} for c, r in self.channels.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Report:
        out = cls()
        for c, r in (d or {}).items():
            out.add(ChannelReport(c, Excursion.from_dict(c, r["first"]), Excursion.from_dict(c, r["worst"])))
        return out


class Extremes:
    """Per lead time and channel: the smallest and largest value and member global mean seen, the number of
    non-finite fields, and the (initial time, member) of each.

    Args:
        channels: the channel names (messages use them).
        lead_hours: the lead times, in hours; :meth:`update` addresses them by index.
        lat: the latitudes of the fields' rows (in their order), for WeatherBench2's area weights.
    """

    _KEYS = ("lo", "hi", "mean_lo", "mean_hi", "nonfinite")

    def __init__(self, channels: Sequence[str], lead_hours: Sequence[float], lat: np.ndarray):
        self.channels = list(channels)
        self.lead_hours = [float(h) for h in lead_hours]
        self.weights = cell_area_weights(np.asarray(lat, dtype=np.float64))
        shape = (len(self.lead_hours), len(self.channels))
        self.lo = np.full(shape, np.inf)
        self.hi = np.full(shape, -np.inf)
        self.mean_lo = np.full(shape, np.inf)
        self.mean_hi = np.full(shape, -np.inf)
        self.nonfinite = np.zeros(shape, dtype=np.int64)
        self._init = {k: np.full(shape, -1, dtype=np.int64) for k in self._KEYS}
        self._member = {k: np.full(shape, -1, dtype=np.int64) for k in self._KEYS}
        self._inits: list[str] = []

    def where(self, key: str, li: int, c: int) -> tuple[str, int | None]:
        """(initial time, member or None) of an extreme."""
        m = int(self._member[key][li, c])
        return self._inits[int(self._init[key][li, c])], (None if m < 0 else m)

    def update(
        self,
        values: np.ndarray,
        inits: Sequence[str],
        lead_index: Sequence[int],
        members: Sequence[int] | None = None,
        skipna: bool = False,
    ) -> None:
        """Add fields ``values`` of shape ``(I, M, L, C, H, W)`` (``members`` given) or ``(I, L, C, H, W)``.

        ``inits``: the I initial times (labels), ``lead_index``: the L lead indices, ``members``: the M member ids.
        ``skipna``: NaN marks missing data (left out), only infinities count as non-finite.
        """
        x = np.asarray(values)
        if members is None:
            x = x[:, None]
        n_i, n_m, n_l, n_c = x.shape[:4]
        if n_c != len(self.channels) or len(inits) != n_i or len(lead_index) != n_l or (members is not None and len(members) != n_m):
            raise ValueError(
                f"fields of shape {values.shape} do not match {len(inits)} inits, {len(lead_index)} leads, {len(self.channels)} channels"
            )
        lo, hi, mean, bad = _summaries(x, self.weights, skipna)  # each (I, M, L, C)
        init_ids = np.array([self._init_id(t) for t in inits], dtype=np.int64)
        member_ids = np.full(n_m, -1, dtype=np.int64) if members is None else np.asarray(members, dtype=np.int64)
        leads = np.asarray(lead_index, dtype=np.int64)
        for key, a, better in (("lo", lo, np.less), ("hi", hi, np.greater), ("mean_lo", mean, np.less), ("mean_hi", mean, np.greater)):
            flat = np.where(np.isfinite(a), a, np.inf if better is np.less else -np.inf).reshape(n_i * n_m, n_l, n_c)
            k = flat.argmin(0) if better is np.less else flat.argmax(0)  # (L, C): which (init, member)
            best = np.take_along_axis(flat, k[None], 0)[0]
            cur = getattr(self, key)[leads]
            take = better(best, cur)
            self._assign(key, leads, take, best, init_ids[k // n_m], member_ids[k % n_m])
        counts = bad.reshape(n_i * n_m, n_l, n_c)
        first = counts.argmax(0)  # the first (init, member) with a non-finite field
        fresh = (counts.sum(0) > 0) & (self.nonfinite[leads] == 0)
        self._init["nonfinite"][leads] = np.where(fresh, init_ids[first // n_m], self._init["nonfinite"][leads])
        self._member["nonfinite"][leads] = np.where(fresh, member_ids[first % n_m], self._member["nonfinite"][leads])
        self.nonfinite[leads] += counts.sum(0)

    def _assign(self, key: str, leads: np.ndarray, take: np.ndarray, best: np.ndarray, init: np.ndarray, member: np.ndarray) -> None:
        arr = getattr(self, key)
        arr[leads] = np.where(take, best, arr[leads])
        self._init[key][leads] = np.where(take, init, self._init[key][leads])
        self._member[key][leads] = np.where(take, member, self._member[key][leads])

    def _init_id(self, t: str) -> int:
        if t not in self._inits:
            self._inits.append(t)
        return self._inits.index(t)


class Moments:
    """A reference's per-channel area-weighted mean and std, min and max, accumulated field by field (float64).

    ``skipna``: NaN marks missing data and is left out.
    """

    def __init__(self, n_channels: int, lat: np.ndarray, skipna: bool = False):
        self.weights = cell_area_weights(np.asarray(lat, dtype=np.float64))
        self.skipna = skipna
        self.w = np.zeros(n_channels)
        self.sum = np.zeros(n_channels)
        self.sumsq = np.zeros(n_channels)
        self.lo = np.full(n_channels, np.inf)
        self.hi = np.full(n_channels, -np.inf)

    def update(self, x: np.ndarray) -> None:
        """Add fields ``x`` of shape ``(N, C, H, W)``."""
        x = np.asarray(x, dtype=np.float64)
        w = np.broadcast_to(self.weights[:, None], x.shape[-2:])
        ok = ~np.isnan(x) if self.skipna else np.ones(x.shape, dtype=bool)
        xz = np.where(ok, x, 0.0)
        wo = ok * w
        self.w += wo.sum(axis=(0, 2, 3))
        self.sum += (xz * wo).sum(axis=(0, 2, 3))
        self.sumsq += (xz * xz * wo).sum(axis=(0, 2, 3))
        self.lo = np.minimum(self.lo, np.where(ok, x, np.inf).min(axis=(0, 2, 3)))
        self.hi = np.maximum(self.hi, np.where(ok, x, -np.inf).max(axis=(0, 2, 3)))

    def bounds(self, channels: Sequence[str], reference: str) -> Bounds:
        mean = self.sum / np.maximum(self.w, 1e-300)
        var = np.maximum(self.sumsq / np.maximum(self.w, 1e-300) - mean**2, 0.0)
        return Bounds.from_moments(channels, mean, np.sqrt(var), self.lo, self.hi, reference)


def _summaries(x: np.ndarray, weights: np.ndarray, skipna: bool) -> tuple[np.ndarray, ...]:
    """Per field of ``x`` (..., H, W): min, max, area-weighted mean (float64) and whether it has non-finite values."""
    n = x.shape[-2] * x.shape[-1]
    mean = np.einsum("...hw,h->...", x, weights, dtype=np.float64) / n  # float64: finite float32 values cannot overflow it
    lo, hi = x.min(axis=(-2, -1)), x.max(axis=(-2, -1))
    bad = ~np.isfinite(mean)
    if bad.any():  # rare: recompute those fields without their non-finite points
        idx = np.nonzero(bad)
        for j in zip(*idx, strict=True):
            f = x[j].astype(np.float64)
            ok = ~np.isnan(f) if skipna else np.isfinite(f)
            w = np.broadcast_to(weights[:, None], f.shape)
            bad[j] = bool(np.isinf(f).any()) if skipna else True
            if ok.any():
                lo[j], hi[j] = f[ok].min(), f[ok].max()
                mean[j] = (f[ok] * w[ok]).sum() / w[ok].sum() if skipna else np.nan
            else:
                lo[j] = hi[j] = mean[j] = np.nan
    return lo.astype(np.float64), hi.astype(np.float64), mean, bad.astype(np.int64)


def lead_text(hours: float) -> str:
    """``30 h``, ``144 h (6 d)``."""
    return f"{hours:g} h ({hours / 24:g} d)" if hours > 0 and hours % 24 == 0 else f"{hours:g} h"


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
