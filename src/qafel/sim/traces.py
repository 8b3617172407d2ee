"""Device traces: each device's compute speed, uplink and downlink bandwidth and availability (docs/traces.md).

Sources: a trace file (JSON or CSV, :func:`load_trace`), a seeded synthetic population
(:func:`synthetic_trace`: log-normal speeds and bandwidths, one diurnal online window a day) and FedScale's
device capacity and behaviour pickles (:func:`read_fedscale`, read with a restricted unpickler that admits
only dicts, lists, numbers and strings). ``qafel-traces`` converts, generates, exports and summarises traces.

Units: seconds, and kilobits per second (1 kbit = 1,000 bits, FedScale's unit), so a message of ``n`` bytes
takes ``n / (kbps * 125)`` seconds (:func:`transfer_seconds`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import numbers
import pickle
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qafel.errors import ConfigError, DataFileError, DataFormatError, QafelError

__all__ = ["Device", "SYNTHETIC_DEFAULTS", "TRACE_FORMAT", "availability_changes", "load_trace", "parse_synthetic",
           "read_fedscale", "save_trace", "synthetic_trace", "to_fedscale", "transfer_seconds"]

TRACE_FORMAT = "qafel-trace/1"
BYTES_PER_KBIT = 125.0  # 1,000 bits
FEDSCALE_AUGMENTATION = 3.0  # FedScale: training costs 3x the measured inference latency (forward + backward)
_TRACE_TAG = 0x7_2ACE  # the synthetic population's seed stream, apart from the schedule's streams

#: The synthetic generator's parameters (conf/timing/trace.yaml sets the same values; tests check it).
SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "s_per_sample": 0.01,     # median seconds of training per sample (log-normal over devices)
    "compute_sigma": 0.5,     # sigma of log(s_per_sample)
    "uplink_kbps": 2000.0,    # median uplink
    "downlink_kbps": 10000.0,  # median downlink
    "bandwidth_sigma": 0.7,   # sigma of log(bandwidth), uplink and downlink drawn independently
    "period": 86400.0,        # availability repeats every period seconds (a day); null: always online
    "online_fraction": 0.5,   # mean fraction of each period a device is online, in one window
    "online_spread": 0.25,    # window lengths uniform in online_fraction +- online_spread (clipped to [0, 1])
    "peak": 0.0,              # window centres cluster around this fraction of the period (0: the run starts there)
    "phase_sigma": 0.15,      # ... with this standard deviation (fraction of the period; large: flat)
}


@dataclass(frozen=True)
class Device:
    """One device's row of a trace. ``online``: the [from, to) windows in seconds (None: always online; empty:
    never); with ``period`` they repeat every ``period`` seconds (0 <= from < to <= period), else they happen once.
    Exactly one of ``s_per_sample`` (seconds per training sample) and ``s_per_step`` (per local step) is set."""

    uplink_kbps: float
    downlink_kbps: float
    s_per_sample: float | None = None
    s_per_step: float | None = None
    online: tuple[tuple[float, float], ...] | None = None
    period: float | None = None
    id: str = ""
    device: str = ""  # a device model name (FedScale's ``model``), informational


def transfer_seconds(nbytes: int, kbps: float) -> float:
    """Seconds to move ``nbytes`` bytes at ``kbps`` kilobits per second."""
    return nbytes / (kbps * BYTES_PER_KBIT) if nbytes else 0.0


def merged_windows(online: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Windows sorted, with overlapping and touching ones merged."""
    out: list[list[float]] = []
    for a, b in sorted(online):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def availability_changes(d: Device) -> tuple[bool, Iterator[float]]:
    """Whether the device is online at time 0, and the times (increasing) at which it goes offline, online,
    offline, ... after that (finite unless the windows repeat)."""
    if d.online is None:
        return True, iter(())
    ws = merged_windows(d.online)
    if not ws:
        return False, iter(())
    on0 = ws[0][0] <= 0.0
    period = d.period
    if period is None:
        flat = [x for w in ws for x in w]
        return on0, iter(flat[1:] if on0 else flat)
    if ws == [(0.0, period)]:
        return True, iter(())
    return on0, _repeating(ws, period)


def _repeating(ws: list[tuple[float, float]], period: float) -> Iterator[float]:
    if ws[0][0] == 0.0 and ws[-1][1] == period:  # the last window runs on into the next period's first
        yield ws[0][1]
        cycle = [*ws[1:-1], (ws[-1][0], period + ws[0][1])]
        skip_first_on = False
    else:
        cycle = ws
        skip_first_on = ws[0][0] == 0.0
    k = 0
    while True:
        base = k * period
        for i, (a, b) in enumerate(cycle):
            if not (k == 0 and i == 0 and skip_first_on):
                yield base + a
            yield base + b
        k += 1


# ------------------------------------------------------------------------------------------ validation
def _number(value: Any, where: str, what: str, *, positive: bool = True, optional: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        if optional:
            return None
        raise DataFormatError(f"{where}: {what} is missing")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DataFormatError(f"{where}: {what}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise DataFormatError(f"{where}: {what}={value!r} must be a finite number")
    x = float(value)
    if (positive and not x > 0) or x < 0:
        raise DataFormatError(f"{where}: {what}={value!r} must be {'> 0' if positive else '>= 0'}")
    return x


def _device(row: Mapping[str, Any], where: str) -> Device:
    known = {"id", "s_per_sample", "s_per_step", "uplink_kbps", "downlink_kbps", "online", "period", "device"}
    extra = sorted(set(row) - known)
    if extra:
        raise DataFormatError(f"{where}: unknown field {extra[0]!r} (fields: {', '.join(sorted(known))})")
    sps = _number(row.get("s_per_sample"), where, "s_per_sample", optional=True)
    spt = _number(row.get("s_per_step"), where, "s_per_step", optional=True)
    if (sps is None) == (spt is None):
        raise DataFormatError(f"{where}: set exactly one of s_per_sample and s_per_step")
    up = _number(row.get("uplink_kbps"), where, "uplink_kbps")
    down = _number(row.get("downlink_kbps"), where, "downlink_kbps")
    period = _number(row.get("period"), where, "period", optional=True)
    online = row.get("online")
    windows: tuple[tuple[float, float], ...] | None = None
    if online is not None:
        if not isinstance(online, list | tuple):
            raise DataFormatError(f"{where}: online must be a list of [from, to] windows or null (always online)")
        out = []
        for i, w in enumerate(online):
            if not isinstance(w, list | tuple) or len(w) != 2:
                raise DataFormatError(f"{where}: online[{i}]={w!r} must be a [from, to] pair")
            a = _number(w[0], where, f"online[{i}] from", positive=False)
            b = _number(w[1], where, f"online[{i}] to", positive=False)
            assert a is not None and b is not None
            if not a < b:
                raise DataFormatError(f"{where}: online[{i}]=[{a:g}, {b:g}]: from must be < to")
            if period is not None and b > period:
                raise DataFormatError(f"{where}: online[{i}]=[{a:g}, {b:g}] ends after period={period:g}")
            out.append((a, b))
        windows = tuple(out)
    assert up is not None and down is not None
    return Device(up, down, sps, spt, windows, period, str(row.get("id", "")), str(row.get("device") or ""))


# --------------------------------------------------------------------------------------------- files
_CSV_FIELDS = ("id", "s_per_sample", "s_per_step", "uplink_kbps", "downlink_kbps", "online", "period", "device")


def load_trace(path: str | Path) -> list[Device]:
    """Read a trace file (``.json`` or ``.csv``; docs/traces.md). Any problem raises a one-line DataFormatError
    (DataFileError when the file is absent) naming the file."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"{p}: no such trace file (timing.trace_file; write one with qafel-traces)")
    suffix = p.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise DataFormatError(f"{p}: a trace file must end in .json or .csv")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{p}: cannot read ({' '.join(str(exc).split())})") from None
    devices = _read_json(p, text) if suffix == ".json" else _read_csv(p, text)
    if not devices:
        raise DataFormatError(f"{p}: the trace has no devices")
    if all(d.online is not None and not d.online for d in devices):
        raise DataFormatError(f"{p}: no device is ever online")
    return devices


def _read_json(p: Path, text: str) -> list[Device]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{p}:{exc.lineno}: not JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT or not isinstance(doc.get("clients"), list):
        raise DataFormatError(f"{p}: not a qafel trace (a JSON object with \"format\": \"{TRACE_FORMAT}\" and a "
                              "\"clients\" list)")
    out = []
    for i, row in enumerate(doc["clients"]):
        if not isinstance(row, dict):
            raise DataFormatError(f"{p}: clients[{i}] is not an object")
        out.append(_device(row, f"{p}: clients[{i}]"))
    return out


def _read_csv(p: Path, text: str) -> list[Device]:
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    missing = [f for f in ("uplink_kbps", "downlink_kbps") if f not in fields]
    if missing:
        raise DataFormatError(f"{p}:1: the header lacks {missing[0]} (columns: {', '.join(_CSV_FIELDS)})")
    out = []
    for line, row in enumerate(reader, 2):
        if None in row:
            raise DataFormatError(f"{p}:{line}: more cells than header columns")
        row = {k: v for k, v in row.items() if v is not None}
        cell = (row.get("online") or "").strip()
        if cell == "":
            row["online"] = None
        elif cell == "never":
            row["online"] = []
        else:
            pairs = []
            for part in cell.split():
                a, sep, b = part.partition(":")
                if not sep:
                    raise DataFormatError(f"{p}:{line}: online window {part!r} must be from:to")
                pairs.append([a, b])
            row["online"] = pairs
        for key in ("id", "device"):
            row.setdefault(key, "")
        out.append(_device(row, f"{p}:{line}"))
    return out


def _num_text(x: float | None) -> Any:
    return None if x is None else (int(x) if float(x).is_integer() and abs(x) < 2**53 else x)


def save_trace(devices: Sequence[Device], path: str | Path) -> Path:
    """Write a trace file (``.json`` or ``.csv`` by the suffix) that :func:`load_trace` reads back exactly."""
    p = Path(path)
    rows = [{"id": d.id, "s_per_sample": _num_text(d.s_per_sample), "s_per_step": _num_text(d.s_per_step),
             "uplink_kbps": _num_text(d.uplink_kbps), "downlink_kbps": _num_text(d.downlink_kbps),
             "online": None if d.online is None else [[_num_text(a), _num_text(b)] for a, b in d.online],
             "period": _num_text(d.period), "device": d.device} for d in devices]
    if p.suffix.lower() == ".json":
        p.write_text(json.dumps({"format": TRACE_FORMAT, "clients": rows}, indent=1) + "\n")
        return p
    if p.suffix.lower() != ".csv":
        raise DataFormatError(f"{p}: a trace file must end in .json or .csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        online = r["online"]
        cell = "" if online is None else "never" if not online else " ".join(f"{a!r}:{b!r}" for a, b in online)
        w.writerow({**{k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in r.items()},
                    "online": cell})
    p.write_text(buf.getvalue())
    return p


# ----------------------------------------------------------------------------------------- synthetic
def parse_synthetic(node: Any, prefix: str = "timing.synthetic") -> dict[str, Any]:
    """The synthetic generator's parameters, defaults filled in; a bad one raises ConfigError naming its key."""
    node = {} if node is None else node
    if not hasattr(node, "items"):
        raise ConfigError(prefix, node, "must be a mapping with keys " + ", ".join(SYNTHETIC_DEFAULTS))
    for key in node:
        if key not in SYNTHETIC_DEFAULTS:
            raise ConfigError(f"{prefix}.{key}", node[key], "unknown key; allowed: " + ", ".join(SYNTHETIC_DEFAULTS))
    out = {}
    for key, default in SYNTHETIC_DEFAULTS.items():
        value = node.get(key, default)
        if key == "period" and value is None:
            out[key] = None
            continue
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
        lo_ok = ok and (float(value) >= 0 if key in ("compute_sigma", "bandwidth_sigma", "online_spread",
                                                     "phase_sigma") else float(value) > 0)
        if key in ("online_fraction", "peak") and ok:
            lo_ok = 0.0 <= float(value) <= 1.0
        if not lo_ok:
            rule = ("in [0, 1]" if key in ("online_fraction", "peak") else ">= 0" if key.endswith(("sigma", "spread"))
                    else "> 0" + (" or null (always online)" if key == "period" else ""))
            raise ConfigError(f"{prefix}.{key}", value, f"must be a number {rule}")
        out[key] = float(value)
    return out


def synthetic_trace(params: Mapping[str, Any], num_clients: int, seed: int) -> list[Device]:
    """A seeded population of ``num_clients`` devices (docs/traces.md, "Synthetic"): log-normal seconds per
    sample and bandwidths around the medians; one online window per period, its length a uniform fraction of
    the period around ``online_fraction`` and its centre normal around ``peak`` (windows crossing the period's
    end wrap to its start). A pure function of (params, num_clients, seed)."""
    p = parse_synthetic(params)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TRACE_TAG]))
    n = num_clients
    z = rng.standard_normal((3, n))
    sps = (p["s_per_sample"] * np.exp(p["compute_sigma"] * z[0])).tolist()
    up = (p["uplink_kbps"] * np.exp(p["bandwidth_sigma"] * z[1])).tolist()
    down = (p["downlink_kbps"] * np.exp(p["bandwidth_sigma"] * z[2])).tolist()
    frac = np.clip(p["online_fraction"] + p["online_spread"] * rng.uniform(-1.0, 1.0, n), 0.0, 1.0).tolist()
    centre = ((p["peak"] + p["phase_sigma"] * rng.standard_normal(n)) % 1.0).tolist()
    period = p["period"]
    out = []
    for c in range(n):
        online: tuple[tuple[float, float], ...] | None = None
        if period is not None and frac[c] < 1.0:
            online = _window(centre[c], frac[c], period)
        out.append(Device(up[c], down[c], s_per_sample=sps[c], online=online,
                          period=period if online is not None else None, id=str(c)))
    return out


def _window(centre: float, frac: float, period: float) -> tuple[tuple[float, float], ...]:
    if frac <= 0.0:
        return ()
    a, b = (centre - frac / 2.0) % 1.0 * period, (centre + frac / 2.0) % 1.0 * period
    if a < b:
        return ((a, b),)
    pieces = ((0.0, b), (a, period))  # wraps around the period's end
    return tuple(w for w in pieces if w[0] < w[1])


# ----------------------------------------------------------------------------------------------- FedScale
class _DataOnlyUnpickler(pickle.Unpickler):
    """Admits no global at all: only what pickle builds from its own opcodes (dicts, lists, tuples, numbers,
    strings, ...); :func:`_check_plain` then refuses anything but dicts, lists, numbers, strings and None."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def _check_plain(x: Any, depth: int = 0) -> None:
    if depth > 8:
        raise pickle.UnpicklingError("nested too deeply")
    if isinstance(x, dict):
        for k, v in x.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(x, list):
        for v in x:
            _check_plain(v, depth + 1)
    elif x is not None and not isinstance(x, int | float | str):
        raise pickle.UnpicklingError(f"a {type(x).__name__} (only dicts, lists, numbers, strings and None are "
                                     "admitted)")


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle a file that may hold only dicts, lists, numbers, strings (and None); anything else (a class, a
    function, a reduce call) is refused with a one-line DataFormatError, before anything is executed."""
    p = Path(path)
    try:
        blob = p.read_bytes()
    except FileNotFoundError:
        raise DataFileError(f"{p}: no such file") from None
    except OSError as exc:
        raise DataFormatError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(blob)).load()
        _check_plain(obj)
    except Exception as exc:  # noqa: BLE001 - a refused global, a truncated or garbled pickle: one answer
        raise DataFormatError(f"{p}: refused: not a plain-data pickle ({' '.join(str(exc).split())})") from None
    return obj


def _fedscale_dict(obj: Any, p: Path, what: str) -> dict[Any, dict[str, Any]]:
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, dict) for v in obj.values()):
        raise DataFormatError(f"{p}: not a FedScale {what} file (a dict of client id -> dict)")
    return obj


def _sort_ids(keys: Any) -> list[Any]:
    return sorted(keys, key=lambda k: (0, k, "") if isinstance(k, int | float) else (1, 0, str(k)))


def read_fedscale(capacity: str | Path, behaviour: str | Path | None = None, clients: int | None = None,
                  augmentation: float = FEDSCALE_AUGMENTATION) -> list[Device]:
    """Devices from FedScale's ``client_device_capacity`` ({id: {"computation": ms per sample of inference,
    "communication": kbit/s}}) and ``client_behave_trace`` ({id: {"active": [s...], "inactive": [s...],
    "finish_time": s, ...}}) pickles, as FedScale reads them (fedscale/cloud/internal/client_metadata.py):
    training takes ``augmentation`` (3) x the inference latency per sample, one bandwidth serves both
    directions, and device i is online in [active[j], inactive[j]), repeating every ``finish_time``.

    Row i pairs the i-th capacity entry with the i-th behaviour entry (ids in sorted order), the shorter file
    cycling; there are ``clients`` rows (default: as many as the longer file). Without a behaviour file every
    device is always online.
    """
    cp = Path(capacity)
    cap = _fedscale_dict(load_plain_pickle(cp), cp, "device capacity")
    beh: dict[Any, dict[str, Any]] | None = None
    bp = Path(behaviour) if behaviour is not None else None
    if bp is not None:
        beh = _fedscale_dict(load_plain_pickle(bp), bp, "behaviour trace")
    cap_ids = _sort_ids(cap)
    beh_ids = _sort_ids(beh) if beh is not None else []
    n = clients if clients is not None else max(len(cap_ids), len(beh_ids))
    if n < 1:
        raise ConfigError("--clients", n, "must be >= 1")
    out = []
    for i in range(n):
        cid = cap_ids[i % len(cap_ids)]
        entry = cap[cid]
        where = f"{cp}: client {cid!r}"
        ms = _number(entry.get("computation"), where, "computation")
        kbps = _number(entry.get("communication"), where, "communication")
        assert ms is not None and kbps is not None
        online, period, model, ident = None, None, "", str(cid)
        if beh is not None and bp is not None:
            bid = beh_ids[i % len(beh_ids)]
            online, period, model = _fedscale_windows(beh[bid], f"{bp}: client {bid!r}")
            ident = f"{cid}/{bid}"
        out.append(Device(kbps, kbps, s_per_sample=augmentation * ms / 1000.0, online=online, period=period,
                          id=ident, device=model))
    return out


def _fedscale_windows(entry: dict[str, Any], where: str) -> tuple[tuple[tuple[float, float], ...], float, str]:
    active, inactive = entry.get("active"), entry.get("inactive")
    if not isinstance(active, list) or not isinstance(inactive, list) or len(active) != len(inactive):
        raise DataFormatError(f"{where}: active and inactive must be lists of the same length")
    finish = _number(entry.get("finish_time"), where, "finish_time")
    assert finish is not None
    windows = []
    for j, (a, b) in enumerate(zip(active, inactive, strict=True)):
        lo = _number(a, where, f"active[{j}]", positive=False)
        hi = _number(b, where, f"inactive[{j}]", positive=False)
        assert lo is not None and hi is not None
        lo, hi = min(lo, finish), min(hi, finish)  # FedScale reads the trace modulo finish_time
        if lo < hi:
            windows.append((lo, hi))
    return tuple(windows), finish, str(entry.get("model") or "")


def to_fedscale(devices: Sequence[Device], augmentation: float = FEDSCALE_AUGMENTATION
                ) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, Any]]]:
    """FedScale's capacity and behaviour dicts for these devices (ids 1, 2, ...; :func:`read_fedscale` reads
    them back). FedScale has one bandwidth per device: the uplink's. Seconds per step and non-repeating
    windows have no FedScale form and are refused; an always-online device gets one window over its period."""
    cap: dict[int, dict[str, float]] = {}
    beh: dict[int, dict[str, Any]] = {}
    for i, d in enumerate(devices, 1):
        if d.s_per_sample is None:
            raise ValueError(f"device {i - 1}: FedScale traces know seconds per sample only (this one has s_per_step)")
        cap[i] = {"computation": d.s_per_sample * 1000.0 / augmentation, "communication": d.uplink_kbps}
        if d.online is not None and d.period is None:
            raise ValueError(f"device {i - 1}: FedScale windows repeat every finish_time: this one has no period")
        period = d.period if d.period is not None else 86400.0
        ws = list(d.online) if d.online is not None else [(0.0, period)]
        beh[i] = {"duration": period, "finish_time": period, "active": [a for a, _ in ws],
                  "inactive": [b for _, b in ws], "model": d.device}
    return cap, beh


# ---------------------------------------------------------------------------------------------------- CLI
def describe(devices: Sequence[Device]) -> str:
    """A few lines on a trace: devices, medians, and the fraction online over one period."""
    def med(xs: list[float]) -> str:
        return f"{float(np.median(xs)):.4g}" if xs else "-"

    sps = [d.s_per_sample for d in devices if d.s_per_sample is not None]
    spt = [d.s_per_step for d in devices if d.s_per_step is not None]
    lines = [f"devices           {len(devices)}",
             f"s per sample      median {med(sps)} ({len(sps)} devices)" if sps else "",
             f"s per step        median {med(spt)} ({len(spt)} devices)" if spt else "",
             f"uplink kbit/s     median {med([d.uplink_kbps for d in devices])}",
             f"downlink kbit/s   median {med([d.downlink_kbps for d in devices])}"]
    periods = {d.period for d in devices if d.online is not None}
    always = sum(d.online is None for d in devices)
    lines.append(f"always online     {always}")
    if len(periods) == 1 and None not in periods:
        (period,) = periods
        grid = np.linspace(0.0, period, 24, endpoint=False)
        frac = [sum(_online_at(d, t) for d in devices) / len(devices) for t in grid]
        lines.append("online fraction   " + " ".join(f"{f:.2f}" for f in frac) + f"  (24 points over {period:g} s)")
    return "\n".join(x for x in lines if x)


def _online_at(d: Device, t: float) -> bool:
    if d.online is None:
        return True
    phase = t % d.period if d.period is not None else t
    return any(a <= phase < b for a, b in d.online)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``qafel-traces`` command: convert, synthetic, export-fedscale, show."""
    parser = argparse.ArgumentParser(prog="qafel-traces", description="Device traces for timing=trace "
                                     "(docs/traces.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="FedScale capacity (+ behaviour) pickles -> a qafel trace file")
    conv.add_argument("--capacity", required=True, metavar="FILE", help="client_device_capacity pickle")
    conv.add_argument("--behaviour", "--behavior", metavar="FILE", help="client_behave_trace pickle")
    conv.add_argument("--clients", type=int, metavar="N", help="rows to write (default: the longer file's)")
    conv.add_argument("--augmentation", type=float, default=FEDSCALE_AUGMENTATION, metavar="F",
                      help="training cost / inference latency (FedScale: 3)")
    conv.add_argument("-o", "--out", required=True, metavar="FILE", help="output trace (.json or .csv)")
    syn = sub.add_parser("synthetic", help="write a synthetic trace (the timing.trace=synthetic population)")
    syn.add_argument("--clients", type=int, required=True, metavar="N")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a generator parameter (" + ", ".join(SYNTHETIC_DEFAULTS) + ")")
    syn.add_argument("-o", "--out", required=True, metavar="FILE")
    exp = sub.add_parser("export-fedscale", help="a qafel trace -> FedScale capacity and behaviour pickles")
    exp.add_argument("trace", metavar="TRACE")
    exp.add_argument("--capacity", required=True, metavar="FILE")
    exp.add_argument("--behaviour", "--behavior", required=True, metavar="FILE")
    show = sub.add_parser("show", help="summarise a trace file")
    show.add_argument("trace", metavar="TRACE")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            devices = read_fedscale(args.capacity, args.behaviour, args.clients, args.augmentation)
            print(f"wrote {save_trace(devices, args.out)}: {len(devices)} devices")
        elif args.command == "synthetic":
            if args.clients < 1:
                raise ConfigError("--clients", args.clients, "must be >= 1")
            params: dict[str, Any] = {}
            for item in args.set:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ConfigError("--set", item, "must be KEY=VALUE")
                params[key] = None if value == "null" else float(value)
            devices = synthetic_trace(params, args.clients, args.seed)
            print(f"wrote {save_trace(devices, args.out)}: {len(devices)} devices")
        elif args.command == "export-fedscale":
            cap, beh = to_fedscale(load_trace(args.trace))
            Path(args.capacity).write_bytes(pickle.dumps(cap))
            Path(args.behaviour).write_bytes(pickle.dumps(beh))
            print(f"wrote {args.capacity} and {args.behaviour}: {len(cap)} devices")
        else:
            print(describe(load_trace(args.trace)))
    except (QafelError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
