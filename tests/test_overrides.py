"""Every override takes effect: two-spelling settings (one rule), and any group swapped under any experiment.

Each experiment runs briefly on format-identical fixtures of its dataset (mushrooms: the real file), with every
quantizer choice in each direction, and the payload sizes are checked against the quantizer the override asked for.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, FAST, REPO, compose_cfg, need_data_file
from omegaconf import OmegaConf

from qafel.data.fixtures import (
    write_celeba_leaf,
    write_cifar10,
    write_fashion_mnist,
    write_plays,
    write_shakespeare_leaf,
)
from qafel.errors import ConfigError
from qafel.experiment.compose import compose
from qafel.experiment.config import validate
from qafel.experiment.runner import make_engine, setup_run
from qafel.quantizers import build_quantizer

EXPERIMENTS = ("paper_logreg", "paper_celeba", "paper_cifar10", "paper_cifar10_concurrency", "paper_shakespeare",
               "fmnist_bitgrid", "shakespeare_roles", "bandwidth_limited")
QUICK = (*FAST, "run.server_steps=1", "run.eval_every=1", "algorithm.buffer_size=2", "run.compute_optimum=false")
# Per experiment: overrides that make it run on the fixtures written by `fixture_root`.
ON_FIXTURES = {
    "paper_logreg": ("dataset.num_clients=4",),
    "paper_celeba": (),
    "paper_cifar10": ("dataset.num_clients=6",),
    "paper_cifar10_concurrency": ("dataset.num_clients=6",),
    "paper_shakespeare": ("dataset.seq_length=12", "client.batch_size=4"),
    "fmnist_bitgrid": ("dataset.num_clients=6",),
    "bandwidth_limited": ("dataset.num_clients=6",),
    "shakespeare_roles": ("dataset.file=plays", "dataset.seq_length=12", "dataset.stride=40", "client.batch_size=4"),
}
# Quantizer choices and the options each one's group file sets (the oracle for the payload size).
CHOICES = {
    "identity": {"name": "identity"},
    "qsgd": {"name": "qsgd", "bits": 4, "bucket": "fixed", "bucket_size": 64, "coding": "fixed"},
    "minmax": {"name": "minmax", "bits": 4, "weights_only": True},
    "topk": {"name": "topk", "fraction": 0.1},
    "randk": {"name": "randk", "fraction": 0.1},
    "sign": {"name": "sign", "bucket": "vector"},
    "fp16": {"name": "fp16"},
    "bf16": {"name": "bf16"},
}
VECTOR = {side: {"name": "qsgd", "levels": levels, "bucket": "vector", "bucket_size": 64, "coding": "fixed"}
          for side, levels in (("client_quantizer", 4), ("server_quantizer", 8))}
SIDES = ("client_quantizer", "server_quantizer")


def test_the_quantizer_groups_offer_every_codec_and_the_paper_option():
    for side in SIDES:
        assert sorted(p.stem for p in (CONF / side).glob("*.yaml")) == sorted([*CHOICES, "qsgd_vector"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_choose_option_files_instead_of_setting_group_keys(experiment):
    """What an experiment sets for one choice of a group lives in an option file of that group, so swapping the
    group under the experiment gets the new choice's own defaults."""
    body = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    assert not set(body) & {"dataset", "model", "client_quantizer", "server_quantizer", "timing"}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    """A data root holding a fixture of every experiment's dataset (and the real mushrooms file)."""
    root = tmp_path_factory.mktemp("data")
    shutil.copy(need_data_file("mushrooms.libsvm"), root / "mushrooms.libsvm")
    write_celeba_leaf(root, users=5, per_user=6)
    write_cifar10(root, per_batch=8, n_test=10)
    write_fashion_mnist(root, n_train=40, n_test=10)
    write_shakespeare_leaf(root, users=3, train=8, test=4, seq=12)
    write_plays(root / "plays", plays=1, roles=2)
    return root


@functools.cache
def _closed_loop(experiment: str) -> bool:
    return compose_cfg(f"experiment={experiment}").timing.get("concurrency") is not None  # closed loop, or a trace's


def brief_run(root: Path, experiment: str, *overrides: str, closed: bool | None = None) -> tuple[dict, object]:
    """Compose as run.py does, run one server step with about two jobs in flight; (summary, RunSetup).

    ``closed``: whether the run's timing is a closed loop (default: the experiment's own timing's)."""
    closed = _closed_loop(experiment) if closed is None else closed
    calm = "timing.concurrency=2" if closed else "timing.rate=2"
    s = setup_run(compose_cfg(f"experiment={experiment}", *QUICK, f"paths.data_root={root}", *ON_FIXTURES[experiment],
                              calm, *overrides))
    summary = make_engine(s).run()
    assert summary["status"] == "completed" and summary["server_steps"] == 1
    return summary, s


def payload(summary: dict, side: str) -> float:
    return summary["message_bytes_up" if side == "client_quantizer" else "message_bytes_broadcast"]


@pytest.mark.parametrize("choice", [*CHOICES, "qsgd_vector"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_any_quantizer_can_be_swapped_under_any_experiment(fixture_root, experiment, side, choice):
    summary, s = brief_run(fixture_root, experiment, f"{side}={choice}")
    want = VECTOR[side] if choice == "qsgd_vector" else CHOICES[choice]
    assert OmegaConf.to_container(s.cfg[side]) == {**dict.fromkeys(s.cfg[side]), **want}
    assert payload(summary, side) == build_quantizer(want, s.model.layout).payload_bytes()


# (group choice or None to keep the experiment's own, override, the options the run must use)
SPELLING_CASES = [
    ("qsgd", "levels=2", {"name": "qsgd", "levels": 2, "bucket": "fixed", "bucket_size": 64, "coding": "fixed"}),
    ("qsgd_vector", "bits=2", {"name": "qsgd", "bits": 2, "bucket": "vector"}),
    ("topk", "fraction=0.25", {"name": "topk", "fraction": 0.25}),
    ("topk", "k=7", {"name": "topk", "k": 7}),
    (None, "bits=2", None),  # the experiment's own quantizer, bits given on the command line (the issue's example)
]


@pytest.mark.parametrize("case", range(len(SPELLING_CASES)))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_spelling_takes_effect_under_each_experiment(fixture_root, experiment, side, case):
    choice, override, want = SPELLING_CASES[case]
    if choice is None:
        own = validate(compose_cfg(f"experiment={experiment}"))[side]
        want = {**{k: v for k, v in OmegaConf.to_container(own).items() if v is not None}, "bits": 2}
        want.pop("levels", None)
    group = (f"{side}={choice}",) if choice else ()
    summary, s = brief_run(fixture_root, experiment, *group, f"{side}.{override}")
    key, other = ("bits", "levels") if override.split("=")[0] in ("bits", "levels") else ("fraction", "k")
    if override.startswith(("levels", "k=")):
        key, other = other, key
    assert s.cfg[side][key] is not None and s.cfg[side].get(other) is None  # config.yaml: the effective one only
    assert payload(summary, side) == build_quantizer(want, s.model.layout).payload_bytes()


@pytest.mark.parametrize("override, steps, epochs", [("client.local_steps=3", 3, None),
                                                     ("client.local_epochs=2", None, 2)])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_local_steps_or_epochs_take_effect_under_each_experiment(fixture_root, experiment, override, steps, epochs):
    _, s = brief_run(fixture_root, experiment, override)
    assert (s.cfg.client.local_steps, s.cfg.client.local_epochs) == (steps, epochs)


@pytest.mark.parametrize("model", ["mlp", "logreg"])
def test_a_model_swapped_under_an_experiment_gets_its_group_defaults(fixture_root, model):
    cfg = validate(compose_cfg("experiment=paper_logreg", f"model={model}"))
    assert (cfg.model.name, cfg.model.init, cfg.model.l2) == (model, "default", 0.0)  # not logreg_paper's


@pytest.mark.parametrize("experiment", ["paper_cifar10", "paper_logreg"])
@pytest.mark.parametrize("timing", ["open_loop", "closed_loop"])
def test_a_timing_swapped_under_an_experiment_gets_its_group_defaults(fixture_root, experiment, timing):
    summary, s = brief_run(fixture_root, experiment, f"timing={timing}", "timing.duration.sigma=0.5",
                           closed=timing == "closed_loop")
    assert s.cfg.timing.name == timing and s.cfg.timing.duration.sigma == 0.5
    if timing == "open_loop":  # the group's Poisson starts, not the paper's constant ones
        assert (s.cfg.timing.arrival, s.cfg.timing.concurrency, s.cfg.timing.restart_model) == ("poisson", None, None)
    else:
        assert (s.cfg.timing.rate, s.cfg.timing.arrival, s.cfg.timing.restart) == (None, None, "same")


def test_a_dataset_swapped_under_an_experiment_gets_its_group_defaults(fixture_root):
    summary, s = brief_run(fixture_root, "paper_cifar10", "dataset=synthetic_images", "dataset.num_samples=120",
                           "dataset.num_clients=6")
    assert s.cfg.dataset.partition == "dirichlet" and summary["num_parameters"] == 31_594
    cifar_like = validate(compose_cfg("experiment=paper_cifar10", "dataset=synthetic_cifar10")).dataset
    assert (cifar_like.partition, cifar_like.alpha, cifar_like.num_clients, cifar_like.num_samples) == \
        ("power_law", 0.1, 5000, 60_000)


# --------------------------------------------------------------------------------------------- the rule itself
def test_on_the_command_line_the_later_spelling_wins():
    a = compose_cfg("client_quantizer.levels=3", "client_quantizer.bits=2").client_quantizer
    b = compose_cfg("client_quantizer.bits=2", "client_quantizer.levels=3").client_quantizer
    assert (a.bits, a.levels) == (2, None) and (b.bits, b.levels) == (None, 3)


def test_the_command_line_wins_over_an_experiment_and_an_experiment_over_the_group_default():
    cli = compose_cfg("experiment=paper_logreg", "client_quantizer.bits=2").client_quantizer
    assert (cli.bits, cli.levels, cli.bucket) == (2, None, "vector")
    steps = compose_cfg("experiment=paper_cifar10", "client.local_steps=3").client
    assert (steps.local_steps, steps.local_epochs) == (3, None)


@pytest.fixture
def user_conf(tmp_path) -> Path:
    """A copy of conf/ a user extends with experiments of their own."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    return conf


def test_a_users_experiment_wins_over_the_group_default_without_nulling_the_other_spelling(user_conf):
    (user_conf / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /client_quantizer: qsgd\n\nclient_quantizer:\n  levels: 3\n"
        "client:\n  local_epochs: 2\n")
    cfg = compose(["experiment=mine"], user_conf)
    assert (cfg.client_quantizer.bits, cfg.client_quantizer.levels) == (None, 3)
    assert (cfg.client.local_steps, cfg.client.local_epochs) == (None, 2)
    again = compose(["experiment=mine", "client_quantizer.bits=8"], user_conf)  # and the command line over it
    assert (again.client_quantizer.bits, again.client_quantizer.levels) == (8, None)


def test_both_spellings_in_one_file_stop_with_one_line_naming_both_keys(user_conf):
    (user_conf / "experiment" / "both.yaml").write_text(
        "# @package _global_\nclient_quantizer:\n  levels: 3\n  bits: 2\n")
    with pytest.raises(ConfigError) as info:
        compose(["experiment=both"], user_conf)
    message = str(info.value)
    assert "client_quantizer.bits" in message and "client_quantizer.levels" in message and "\n" not in message


def test_a_config_that_bypassed_compose_with_both_spellings_is_refused():
    raw = OmegaConf.to_container(compose_cfg())
    raw["client_quantizer"]["levels"] = 3
    with pytest.raises(ConfigError, match=r"^client_quantizer\.bits=4: and client_quantizer\.levels=3 are both set"):
        validate(raw)


def test_the_issue_example_sends_the_requested_bits_and_records_only_them(tmp_path):
    root = need_data_file("mushrooms.libsvm").parent
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "experiment=paper_logreg", "client_quantizer.bits=2",
                           "server_quantizer.bits=2", "tracking=none", "run.progress=false", "run.server_steps=20",
                           f"paths.data_root={root}", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["message_bytes_up"] == 4 + 29 and summary["message_bytes_broadcast"] == 4 + 29  # s = 1: 2 bits
    saved = OmegaConf.load(tmp_path / "config.yaml")
    for side in SIDES:
        assert (saved[side].bits, saved[side].levels) == (2, None)


# ------------------------------------------------------------------------------------------------------ sweeps
def sweep_plan(spec_file: str, *overrides: str):
    from qafel.experiment.compose import override_key
    from qafel.sweep import SweepPlan, load_spec, merge_overrides
    from qafel.sweep.driver import _base_config, _context

    spec = load_spec(REPO / "sweeps" / spec_file)
    every = merge_overrides(spec.base, overrides)
    base = _base_config(every, CONF)
    return SweepPlan(spec=spec, study_name="t", storage="sqlite://", sweep_dir=Path("."), overrides=every, conf=CONF,
                     pinned=[override_key(o) for o in overrides], context=_context(base, spec, every))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_a_bit_width_sweep_over_any_experiment_has_distinct_points(experiment):
    from qafel.sweep import format_value
    from qafel.sweep.driver import check_params_take_effect

    plan = sweep_plan("bitgrid.yaml", f"experiment={experiment}")
    check_params_take_effect(plan)  # raises if a parameter composes to one config
    seen = {validate(compose_cfg(*plan.overrides, "algorithm=qafel", f"client_quantizer.bits={format_value(b)}"))
            .client_quantizer.bits for b in (2, 4, 8)}
    assert seen == {2, 4, 8}


@pytest.mark.parametrize("overrides, key", [
    (("algorithm=fedbuff",), None),  # bits are conditional on qafel/naive: never sampled, nothing to check
    (("server_quantizer=identity",), "params.server_quantizer.bits=2: Could not override"),  # identity: no bits
])
def test_a_sweep_parameter_that_changes_nothing_is_refused_before_any_trial(overrides, key):
    from qafel.sweep.driver import check_params_take_effect

    plan = sweep_plan("bitgrid.yaml", *overrides)
    if key is None:
        check_params_take_effect(plan)
        return
    with pytest.raises(ConfigError) as info:
        check_params_take_effect(plan)
    assert str(info.value).startswith(key) and "\n" not in str(info.value)


def test_a_sweep_parameter_pinned_to_fedbuffs_identity_quantizers_is_refused():
    from qafel.sweep.driver import check_params_take_effect

    plan = sweep_plan("pareto_bytes.yaml", "algorithm=fedbuff")  # bits unconditional: fedbuff replaces them
    with pytest.raises(ConfigError, match=r"^params\.client_quantizer\.bits=\[2, 8\]: every value gives the same"):
        check_params_take_effect(plan)


def test_a_sweep_parameter_key_that_does_not_exist_is_refused(tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text("params:\n  client_quantizer.bitz: [2, 4]\nn_trials: 2\n")
    proc = subprocess.run(["qafel-sweep", str(spec), "--sweep-dir", str(tmp_path / "out"), "tracking=none"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: params.client_quantizer.bitz=2:"), proc.stderr
    assert not (tmp_path / "out" / "trials").exists()
