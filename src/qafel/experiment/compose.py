"""Composing a run's config from Hydra overrides, with one rule for the settings that have two spellings.

Some settings can be given two ways: QSGD's ``bits`` or ``levels``, top-k's (and random-k's) ``fraction`` or ``k``,
a client's ``local_steps`` or ``local_epochs``. Exactly one spelling takes effect, the one set last:

1. the command line (Hydra overrides, in order: the later of the two wins),
2. over the config files that change the group's default (an experiment overlay, a parent experiment),
3. over the group default itself (the option file chosen for the group, e.g. ``client_quantizer/qsgd.yaml``;
   for the ``client`` node, ``config.yaml``).

The losing spelling is set to null, so ``config.yaml`` records only the effective value. When the rule cannot
tell (both spellings set at the same level, or a config that did not come through this module), the run stops
with one line naming both keys (:func:`qafel.experiment.config.validate`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from qafel.errors import ConfigError

#: (config node, spelling, other spelling): settings with two spellings. The node's Hydra group (if any) is the
#: node's name; ``client`` has no group, its default lives in config.yaml.
SPELLINGS: tuple[tuple[str, str, str], ...] = (
    ("client_quantizer", "bits", "levels"),
    ("client_quantizer", "fraction", "k"),
    ("server_quantizer", "bits", "levels"),
    ("server_quantizer", "fraction", "k"),
    ("client", "local_steps", "local_epochs"),
)


def config_dir() -> Path:
    """qafel's Hydra config directory: ``QAFEL_CONFIG_DIR``, else ``conf/`` of the (editable) checkout."""
    env = os.environ.get("QAFEL_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "conf"  # src/qafel/experiment/ -> checkout
    if not (path / "config.yaml").is_file():
        raise ConfigError("QAFEL_CONFIG_DIR", str(path), "has no config.yaml: set QAFEL_CONFIG_DIR to the "
                          "repository's conf/ folder (or install qafel editable: pip install -e .)")
    return path


def override_key(override: str) -> str:
    """The key of a Hydra override (``+a.b=1`` -> ``a.b``; ``~a.b`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def settle_spellings(cfg: DictConfig, overrides: Sequence[str],
                     group_default: Callable[[str], Mapping[str, Any] | None]) -> DictConfig:
    """Null the losing spelling of every pair in :data:`SPELLINGS` that has both set (in place; returns ``cfg``).

    ``overrides`` are the command line's Hydra overrides; ``group_default(node)`` returns the node as the group's
    chosen option file (or config.yaml) sets it, or None when unknown. Raises ConfigError naming both keys when
    the rule cannot decide.
    """
    order = {override_key(o): i for i, o in enumerate(overrides) if "=" in o}
    for node, a, b in SPELLINGS:
        section = cfg.get(node)
        if not isinstance(section, DictConfig) or section.get(a) is None or section.get(b) is None:
            continue
        ka, kb = f"{node}.{a}", f"{node}.{b}"
        if ka in order or kb in order:
            loser = b if order.get(ka, -1) > order.get(kb, -1) else a
        else:
            default = group_default(node) or {}
            changed_a = section[a] != default.get(a, section[a])
            changed_b = section[b] != default.get(b, section[b])
            if changed_a == changed_b:
                where = "by the same config file" if changed_a else "by the group's default"
                raise ConfigError(ka, section[a], f"and {kb}={section[b]!r} are both set {where}: set only one of "
                                  f"them (null the other), or give one on the command line")
            loser = b if changed_a else a
        with open_dict(cfg):
            section[loser] = None
    return cfg


def hydra_group_default(choices: Mapping[str, Any], compose_fn: Callable[..., DictConfig]
                        ) -> Callable[[str], Mapping[str, Any] | None]:
    """``group_default`` for :func:`settle_spellings`: the node as its chosen option file (or config.yaml) sets it.

    ``compose_fn`` is Hydra's ``compose`` with an initialized config search path (inside ``hydra.main`` or an
    ``initialize_config_dir`` block).
    """
    def lookup(node: str) -> Mapping[str, Any] | None:
        try:
            if node in choices and choices[node] is not None:
                part = compose_fn(config_name=f"{node}/{choices[node]}")
            else:  # a plain node: its default is config.yaml's, without any group or experiment
                part = compose_fn(config_name="config")
            value = OmegaConf.select(part, node)
        except Exception:  # noqa: BLE001 - an unknown default: settle_spellings then asks for one spelling
            return None
        return OmegaConf.to_container(value) if isinstance(value, DictConfig) else None

    return lookup


def compose(overrides: Sequence[str] = (), conf: str | Path | None = None,
            return_hydra_config: bool = False) -> DictConfig:
    """Compose ``config.yaml`` under ``conf`` (default :func:`config_dir`) with these Hydra overrides, as
    ``python run.py OVERRIDES`` would, settling two-spelling settings (see the module docstring)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(conf or config_dir()).resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
            settle_spellings(cfg, overrides, hydra_group_default(cfg.hydra.runtime.choices, hydra_compose))
    finally:
        GlobalHydra.instance().clear()
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg
