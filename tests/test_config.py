"""Config composition and start-up validation: every experiment composes; bad input names its key."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, FAST, compose_cfg

from qafel.errors import ConfigError, DataFileError
from qafel.experiment.config import validate
from qafel.experiment.runner import make_engine, setup_run

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_there_are_experiment_configs():
    assert "paper_logreg" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_composes_and_validates(name):
    cfg = validate(compose_cfg(f"experiment={name}"))
    assert cfg.run.server_steps >= 1


def test_paper_logreg_has_the_papers_settings():
    cfg = validate(compose_cfg("experiment=paper_logreg"))
    assert (cfg.dataset.name, cfg.dataset.num_clients, cfg.dataset.partition) == ("mushrooms", 100, "contiguous")
    assert (cfg.timing.name, cfg.timing.concurrency) == ("closed_loop", 100)
    assert (cfg.client.local_steps, cfg.client.batch_size, cfg.client.lr) == (10, "full", 2.0)
    assert (cfg.server.lr, cfg.server.reduction, cfg.algorithm.buffer_size) == (0.1, "mean", 10)
    assert cfg.run.server_steps == 10000
    assert (cfg.client_quantizer.levels, cfg.server_quantizer.levels) == (4, 8)


@pytest.mark.parametrize("override, key", [
    ("client_quantizer.bits=0", "client_quantizer.bits=0"),
    ("server_quantizer.bits=1", "server_quantizer.bits=1"),
    ("algorithm.buffer_size=0", "algorithm.buffer_size=0"),
    ("client.local_steps=0", "client.local_steps=0"),
    ("client.lr=-1", "client.lr=-1"),
    ("client.batch_size=0", "client.batch_size=0"),
    ("server.momentum=1.5", "server.momentum=1.5"),
    ("server.reduction=median", "server.reduction='median'"),
    ("server.optimizer=rmsprop", "server.optimizer='rmsprop'"),
    ("run.server_steps=0", "run.server_steps=0"),
    ("run.codec=zip", "run.codec='zip'"),
    ("timing.rate=0", "timing.rate=0"),
    ("client_quantizer=topk client_quantizer.fraction=0", "client_quantizer.fraction=0"),
    ("dataset.num_clients=0", "dataset.num_clients=0"),
    ("dataset.partition=bogus", "dataset.partition='bogus'"),
    ("dataset.alpha=nan", "dataset.alpha=nan: must be a finite number"),
    ("dataset.alpha=inf", "dataset.alpha=inf: must be a finite number"),
    ("client.lr=inf", "client.lr=inf: must be a finite number"),
    ("server.lr=inf", "server.lr=inf: must be a finite number"),
    ("server.lr=nan", "server.lr=nan: must be a finite number"),
    ("model.l2=inf", "model.l2=inf: must be a finite number"),
    ("server.betas=[0.9,nan]", "server.betas[1]=nan: must be a finite number"),
    ("timing.duration.sigma=-inf", "timing.duration.sigma=-inf: must be a finite number"),
    ("seed=-1", "seed=-1: must be an integer in [0, 2^63 - 1"),
    ("seed=9223372036854775808", "seed=9223372036854775808: must be an integer in [0, 2^63 - 1"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        setup_run(compose_cfg(*FAST, *override.split(), "run.server_steps=1" if "server_steps" not in override
                              else "run.eval_every=1"))
    message = str(info.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_the_largest_seed_runs():
    s = setup_run(compose_cfg(*FAST, "seed=9223372036854775807", "run.server_steps=1"))
    assert s.cfg.seed == 2**63 - 1
    assert make_engine(s).run()["status"] == "completed"


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigError, match=r"^client\.lrr"):
        validate(compose_cfg("+client.lrr=0.1"))
    with pytest.raises(ConfigError, match=r"^run\.server_steps"):
        validate(compose_cfg("run.server_steps=many"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_names_the_device_key():
    with pytest.raises(ConfigError, match=r"^device='cuda': needs a CUDA GPU") as info:
        setup_run(compose_cfg(*FAST, "device=cuda"))
    assert "\n" not in str(info.value)


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(DataFileError) as info:
        setup_run(compose_cfg(*FAST, "experiment=paper_logreg", f"paths.data_root={tmp_path}"))
    message = str(info.value)
    assert str(tmp_path / "mushrooms.libsvm") in message and "LIBSVM" in message
    assert "\n" not in message


def test_levels_on_the_command_line_win_over_the_groups_bits():
    s = setup_run(compose_cfg(*FAST, "client_quantizer=qsgd", "client_quantizer.levels=4",
                              "run.server_steps=1"))
    assert s.client_quantizer.s == 4


def test_fedbuff_is_always_unquantized():
    with pytest.warns(UserWarning, match="algorithm=fedbuff sends unquantized"):
        cfg = validate(compose_cfg("experiment=paper_logreg", "algorithm=fedbuff"))
    assert (cfg.client_quantizer.name, cfg.server_quantizer.name) == ("identity", "identity")
