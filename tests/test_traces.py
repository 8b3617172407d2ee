"""qafel.sim.traces: the trace file formats, the synthetic population, FedScale's pickles (converted both ways, read
with a restricted unpickler) and the qafel-traces command."""

from __future__ import annotations

import itertools
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONF, REPO

from qafel.errors import ConfigError, DataFileError, DataFormatError
from qafel.sim.traces import (
    SYNTHETIC_DEFAULTS,
    Device,
    availability_changes,
    load_trace,
    main,
    read_fedscale,
    save_trace,
    synthetic_trace,
    to_fedscale,
    transfer_seconds,
)

SRC = str(REPO / "src")


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``qafel-traces`` as a user runs it (``python -m``: the console script of this checkout)."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "qafel.sim.traces", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


# ------------------------------------------------------------------------------------------------ windows
def changes(d: Device, n: int = 8) -> tuple[bool, list[float]]:
    on, it = availability_changes(d)
    return on, list(itertools.islice(it, n))


def dev(online, period=None) -> Device:
    return Device(8.0, 8.0, s_per_sample=1.0, online=online, period=period)


def test_availability_changes_merge_repeat_and_wrap():
    assert changes(dev(None)) == (True, [])
    assert changes(dev(())) == (False, [])
    assert changes(dev(((0, 10),), 10)) == (True, [])  # the whole period: always online
    assert changes(dev(((2, 4), (6, 8)), 10), 6) == (False, [2, 4, 6, 8, 12, 14])
    assert changes(dev(((0, 3), (7, 10)), 10), 5) == (True, [3, 7, 13, 17, 23])  # 7..13 is one stretch
    assert changes(dev(((0, 3), (5, 6)), 10), 5) == (True, [3, 5, 6, 10, 13])  # back on at 10
    assert changes(dev(((1, 3), (2, 5), (5, 6)), 10), 4) == (False, [1, 6, 11, 16])  # merged
    assert changes(dev(((0, 3), (5, 6)))) == (True, [3, 5, 6])  # once: then offline for good


def test_transfer_seconds_is_bytes_over_kilobits():
    assert transfer_seconds(1000, 8.0) == 1.0 and transfer_seconds(0, 1.0) == 0.0
    assert transfer_seconds(124_072, 200.0) == pytest.approx(4.96288)


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_trace_files_round_trip_exactly(tmp_path, suffix):
    devices = synthetic_trace({"period": 3600.0}, 40, seed=3)
    devices += [Device(1.5, 2.0, s_per_step=0.3, online=None, id="x", device="Pixel 3"),
                Device(3.0, 4.0, s_per_sample=0.1, online=(), period=None, id="never"),
                Device(3.0, 4.0, s_per_sample=0.1, online=((5.0, 7.5), (100.0, 200.0)), period=None)]
    assert load_trace(save_trace(devices, tmp_path / f"t{suffix}")) == devices


def test_the_documented_csv_example_reads(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,s_per_sample,s_per_step,uplink_kbps,downlink_kbps,online,period\n"
                    "phone-1,0.02,,200,1000,0:3600 7200:9000,86400\n"
                    "phone-2,,0.5,1000,5000,,\n"
                    "tablet,0.01,,500,2000,never,\n")
    a, b, c = load_trace(path)
    assert a == Device(200.0, 1000.0, s_per_sample=0.02, online=((0.0, 3600.0), (7200.0, 9000.0)), period=86400.0,
                       id="phone-1")
    assert b.online is None and b.s_per_step == 0.5 and c.online == ()


BAD_FILES = [
    ("t.json", "{", "not JSON"),
    ("t.json", '{"clients": []}', "not a qafel trace"),
    ("t.json", '{"format": "qafel-trace/1", "clients": []}', "the trace has no devices"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": 1}]}',
     "clients[0]: set exactly one of s_per_sample and s_per_step"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": 1, "s_per_sample": 1, '
               '"online": [[5, 3]], "period": 10}]}', "clients[0]: online[0]=[5, 3]: from must be < to"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": 1, "s_per_sample": 1, '
               '"online": [[5, 30]], "period": 10}]}', "ends after period=10"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": "fast", '
               '"s_per_sample": 1}]}', "downlink_kbps='fast' is not a number"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": 1, "s_per_sample": 1, '
               '"color": 1}]}', "unknown field 'color'"),
    ("t.json", '{"format": "qafel-trace/1", "clients": [{"uplink_kbps": 1, "downlink_kbps": 1, "s_per_sample": 1, '
               '"online": []}]}', "no device is ever online"),
    ("t.csv", "id,s_per_sample\n1,2\n", ":1: the header lacks uplink_kbps"),
    ("t.csv", "s_per_sample,uplink_kbps,downlink_kbps,online\n1,1,1,3-4\n", ":2: online window '3-4' must be from:to"),
    ("t.csv", "s_per_sample,uplink_kbps,downlink_kbps\n1,1,1,9\n", ":2: more cells than header columns"),
    ("t.csv", "s_per_sample,uplink_kbps,downlink_kbps\n1,1,nan\n", ":2: downlink_kbps=nan must be a finite number"),
    ("t.txt", "", "a trace file must end in .json or .csv"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES, ids=[b[2][:40] for b in BAD_FILES])
def test_a_bad_trace_file_is_one_line_naming_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataFormatError) as info:
        load_trace(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_trace_file_says_so(tmp_path):
    with pytest.raises(DataFileError, match="no such trace file"):
        load_trace(tmp_path / "absent.json")


# -------------------------------------------------------------------------------------------- synthetic
def test_the_trace_option_file_sets_the_generators_defaults():
    assert yaml.safe_load((CONF / "timing" / "trace.yaml").read_text())["synthetic"] == SYNTHETIC_DEFAULTS


def test_the_synthetic_population_is_seeded_log_normal_and_diurnal():
    devices = synthetic_trace({}, 4000, seed=1)
    assert devices == synthetic_trace({}, 4000, seed=1) and devices != synthetic_trace({}, 4000, seed=2)
    p = SYNTHETIC_DEFAULTS
    for key, sigma in (("s_per_sample", "compute_sigma"), ("uplink_kbps", "bandwidth_sigma"),
                       ("downlink_kbps", "bandwidth_sigma")):
        logs = np.log([getattr(d, key) for d in devices])
        assert np.median(logs) == pytest.approx(math.log(p[key]), abs=0.05)
        assert np.std(logs) == pytest.approx(p[sigma], rel=0.05)
    period = p["period"]

    def fraction_online(t):
        return np.mean([any(a <= t % period < b for a, b in d.online) for d in devices])

    peak, trough = fraction_online(p["peak"] * period), fraction_online((p["peak"] + 0.5) * period)
    assert peak > 0.8 and trough < 0.2  # diurnal: most devices online at the peak, few half a period later
    mean = np.mean([fraction_online(t) for t in np.linspace(0, period, 48, endpoint=False)])
    assert mean == pytest.approx(p["online_fraction"], abs=0.03)
    always = synthetic_trace({"period": None}, 10, seed=1)
    assert all(d.online is None for d in always)


@pytest.mark.parametrize(("params", "message"), [
    ({"uplink_kbps": 0}, r"^timing\.synthetic\.uplink_kbps=0: must be a number > 0"),
    ({"peak": 1.5}, r"^timing\.synthetic\.peak=1\.5: must be a number in \[0, 1\]"),
    ({"compute_sigma": -1}, r"^timing\.synthetic\.compute_sigma=-1: must be a number >= 0"),
    ({"period": 0}, r"^timing\.synthetic\.period=0: must be a number > 0 or null"),
    ({"speed": 1}, r"^timing\.synthetic\.speed=1: unknown key"),
])
def test_bad_synthetic_parameters_name_their_key(params, message):
    with pytest.raises(ConfigError, match=message):
        synthetic_trace(params, 3, 0)


# --------------------------------------------------------------------------------------------- FedScale
def write_fedscale(folder: Path, capacity: dict, behaviour: dict) -> tuple[Path, Path]:
    """FedScale's two pickles, as benchmark/dataset/data/device_info/ holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    cap, beh = folder / "client_device_capacity", folder / "client_behave_trace"
    cap.write_bytes(pickle.dumps(capacity))
    beh.write_bytes(pickle.dumps(behaviour))
    return cap, beh


FEDSCALE_CAPACITY = {1: {"computation": 12.0, "communication": 850.5}, 2: {"computation": 40.0, "communication": 96.0}}
FEDSCALE_BEHAVIOUR = {
    7: {"duration": 172800, "inactive": [3000, 50000], "finish_time": 172800, "active": [0, 40000],
        "model": "SM-G960F"},
    9: {"duration": 86400, "inactive": [86400], "finish_time": 86400, "active": [60000], "model": "Pixel 3"},
}


def test_fedscale_files_convert_with_fedscales_units(tmp_path):
    cap, beh = write_fedscale(tmp_path / "fs", FEDSCALE_CAPACITY, FEDSCALE_BEHAVIOUR)
    a, b, c = read_fedscale(cap, beh, clients=3)
    # FedScale (client_metadata.py): 3 x the inference ms per sample; one kbit/s for both directions
    assert a == Device(850.5, 850.5, s_per_sample=3 * 12.0 / 1000, online=((0.0, 3000.0), (40000.0, 50000.0)),
                       period=172800.0, id="1/7", device="SM-G960F")
    assert b == Device(96.0, 96.0, s_per_sample=3 * 40.0 / 1000, online=((60000.0, 86400.0),), period=86400.0,
                       id="2/9", device="Pixel 3")
    assert (c.id, c.online) == ("1/7", a.online)  # rows cycle as FedScale's client ids do
    only_speed = read_fedscale(cap)
    assert len(only_speed) == 2 and all(d.online is None for d in only_speed)


def test_the_converter_round_trips_a_fedscale_fixture(tmp_path):
    """FedScale pickles -> qafel-traces convert -> trace file -> FedScale dicts again: the same values."""
    original = [d for d in synthetic_trace({"period": 86400.0}, 25, seed=4)]
    cap_dict, beh_dict = to_fedscale(original)
    cap, beh = write_fedscale(tmp_path / "fs", cap_dict, beh_dict)
    proc = cli("convert", "--capacity", str(cap), "--behaviour", str(beh), "-o", "trace.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    converted = load_trace(tmp_path / "trace.json")
    assert len(converted) == 25
    for d, c in zip(original, converted, strict=True):
        assert c.s_per_sample == pytest.approx(d.s_per_sample, rel=1e-12)
        assert c.uplink_kbps == c.downlink_kbps == d.uplink_kbps  # FedScale keeps one bandwidth
        assert c.online == d.online and c.period == d.period
    cap2, beh2 = to_fedscale(converted)
    assert beh2 == beh_dict
    assert cap2.keys() == cap_dict.keys()
    for k in cap_dict:
        assert cap2[k]["communication"] == cap_dict[k]["communication"]
        assert cap2[k]["computation"] == pytest.approx(cap_dict[k]["computation"], rel=1e-12)
    back = cli("export-fedscale", "trace.json", "--capacity", "cap.pkl", "--behaviour", "beh.pkl", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert read_fedscale(tmp_path / "cap.pkl", tmp_path / "beh.pkl") == read_fedscale(cap, beh)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    evil = tmp_path / "client_device_capacity"
    evil.write_bytes(pickle.dumps({1: {"computation": 1.0, "communication": exploit}}))
    with pytest.raises(DataFormatError) as info:
        read_fedscale(evil)
    message = str(info.value)
    assert message.startswith(f"{evil}: refused: not a plain-data pickle") and "system" in message
    assert "\n" not in message and not marker.exists()
    proc = cli("convert", "--capacity", str(evil), "-o", "out.json", cwd=tmp_path)
    assert proc.returncode == 2 and not marker.exists() and not (tmp_path / "out.json").exists()
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("payload", [{1: {"computation": b"12", "communication": 1.0}}, {1: {"computation", 2}},
                                     {1: (1.0, 2.0)}, [1, 2], b"\x80\x04garbage"],
                         ids=["bytes-value", "set", "tuple", "list", "garbage"])  # fixed: a set's str is hash-ordered
def test_pickles_of_anything_but_plain_data_are_refused(tmp_path, payload):
    path = tmp_path / "capacity"
    path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload))
    with pytest.raises(DataFormatError, match=f"^{path}: (refused|not a FedScale device capacity file)"):
        read_fedscale(path)


def test_fedscale_files_with_wrong_contents_name_the_file_and_client(tmp_path):
    cap, beh = write_fedscale(tmp_path, {1: {"computation": -1.0, "communication": 5.0}}, FEDSCALE_BEHAVIOUR)
    with pytest.raises(DataFormatError, match=f"^{cap}: client 1: computation=-1.0 must be > 0"):
        read_fedscale(cap, beh)
    cap, beh = write_fedscale(tmp_path, FEDSCALE_CAPACITY, {3: {"active": [1], "inactive": [], "finish_time": 9}})
    with pytest.raises(DataFormatError, match=f"^{beh}: client 3: active and inactive must be lists of the same"):
        read_fedscale(cap, beh)


# -------------------------------------------------------------------------------------------------- CLI
def test_qafel_traces_synthetic_and_show(tmp_path, capsys):
    assert main(["synthetic", "--clients", "30", "--seed", "2", "--set", "uplink_kbps=100", "-o",
                 str(tmp_path / "s.csv")]) == 0
    devices = load_trace(tmp_path / "s.csv")
    assert devices == synthetic_trace({"uplink_kbps": 100.0}, 30, 2)
    assert main(["show", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "devices           30" in out and "online fraction" in out
    assert main(["synthetic", "--clients", "3", "--set", "bogus=1", "-o", str(tmp_path / "x.json")]) == 2
    assert "timing.synthetic.bogus=1.0: unknown key" in capsys.readouterr().err


def test_qafel_traces_is_a_console_script():
    text = (REPO / "pyproject.toml").read_text()
    assert 'qafel-traces = "qafel.sim.traces:main"' in text
