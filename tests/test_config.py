"""Config composition and validation: bad values fail with a clear message, before TensorFlow."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from fallopt.config import ConfigError, FalloptConfig, as_dict, flatten, validate
from fallopt.data.cauca import CaucaConfig
from fallopt.data.hds import HdsConfig
from fallopt.data.synthetic_falls import SyntheticFallsConfig
from fallopt.identity import config_hash, file_digest

from .conftest import CONF, REPO


def test_default_config_is_the_embedded_fall_run(compose_cfg):
    cfg = validate(compose_cfg())
    assert isinstance(cfg, FalloptConfig)
    assert isinstance(cfg.dataset, SyntheticFallsConfig)
    assert (cfg.dataset.image_size, cfg.dataset.channels) == (96, 3)
    assert cfg.model.name == "cauca_cnn"
    # The default prune group carries sparsity, so `-m prune.sparsity=0.1,0.5` prunes.
    assert cfg.prune.method.value == "constant" and cfg.prune.sparsity == 0.0
    assert cfg.tracking.uri == "sqlite:///mlruns/mlflow.db"


@pytest.mark.parametrize(
    ("overrides", "schema"),
    [
        (["dataset=cauca"], CaucaConfig),
        (["dataset=hds", "model=hds_cnn"], HdsConfig),
        (["+experiment=hds_lab"], HdsConfig),
        (["+experiment=smoke"], SyntheticFallsConfig),
    ],
)
def test_every_dataset_option_composes_to_its_schema(compose_cfg, overrides, schema):
    assert isinstance(validate(compose_cfg(*overrides)).dataset, schema)


# Keys an option needs from the user (YAML `???`), and what else it must be combined with.
NEEDS = {
    "model=keras_file": ["model.path=model.keras"],
    "model=python": ["model.target=my_models:small_cnn"],
    "quant=qat": ["model=cauca_cnn_qat"],
    "quant=pqat": ["model=cauca_cnn_qat"],
    "quant=cqat": ["model=cauca_cnn_qat", "cluster=kmeans"],
    "quant=pcqat": [
        "model=cauca_cnn_qat",
        "cluster=kmeans",
        "cluster.preserve_sparsity=true",
        "prune.sparsity=0.5",
    ],  # fmt: skip
}


def _options() -> list[str]:
    groups = [p for p in CONF.iterdir() if p.is_dir()]
    options = [f"{g.name}={p.stem}" for g in groups for p in sorted(g.glob("*.yaml"))]
    return [f"+{o}" if o.startswith("experiment=") else o for o in options]


@pytest.mark.parametrize("option", _options())
def test_every_option_in_conf_composes_and_validates(option):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # With Hydra's own config, as `python -m fallopt.run` composes: hparams_search
        # overrides the sweeper.
        cfg = compose("config", [option, *NEEDS.get(option, [])], return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    typed = validate(cfg)
    # What every run logs as its params and config.yaml: the same as OmegaConf makes it.
    assert as_dict(typed) == OmegaConf.to_container(OmegaConf.structured(typed), enum_to_str=True)


def test_user_keys_are_overridable(compose_cfg):
    cfg = validate(
        compose_cfg(
            "train.epochs=2",
            "train.batch_size=8",
            "train.learning_rate=0.01",
            "train.val_split=0.3",
            "seed=7",
            "dataset.limit=50",
            "tracking.uri=sqlite:///x.db",
            "tracking.experiment=e",
            "prune.sparsity=0.0",
        )
    )
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.seed, cfg.dataset.limit) == (2, 8, 7, 50)
    assert (cfg.train.learning_rate, cfg.train.val_split) == (0.01, 0.3)
    assert (cfg.tracking.uri, cfg.tracking.experiment) == ("sqlite:///x.db", "e")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", "train.epochs=-1 is invalid: must be >= 0"),
        ("train.epochs=0", "model=cauca_cnn is an architecture: it needs >= 1 epoch"),
        ("model.input_range=[1,0]", "model.input_range=[1.0, 0.0] is invalid"),
        ("train.batch_size=0", "train.batch_size=0"),
        ("train.val_split=1.0", "train.val_split=1.0"),
        ("train.learning_rate=0", "train.learning_rate=0"),
        ("dataset.limit=1", "dataset.limit=1"),
        ("dataset.channels=2", "dataset.channels=2 is invalid: must be 1 or 3"),
        ("model.filters=[]", "model.filters=[]"),
        ("prune.sparsity=1.0", "prune.sparsity=1.0"),
        ("prune=none;prune.sparsity=0.5", "prune=none does not prune"),
        ("prune=polynomial;prune.initial_sparsity=0.6", "must not exceed the final"),
        ("prune.fine_tune_epochs=0", "prune.fine_tune_epochs=0"),
        ("prune.frequency=0", "prune.frequency=0"),
        ("prune.begin=2;prune.end=1", "prune.end=1.0 is invalid: must be > prune.begin"),
        ("prune.scope='conv('", "neither one of"),
        ("prune.m_by_n=[2,4];prune.sparsity=0.3", "set prune.sparsity=0.5"),
        ("prune.m_by_n=[4,2];prune.sparsity=0.5", "0 < m < n"),
        ("prune.per_layer={conv3: 1.0}", "prune.per_layer.conv3=1.0 is invalid"),
        ("prune.per_layer={conv3: x}", "prune.per_layer.conv3='x' is invalid: must be a sparsity"),
        ("prune.per_layer=[conv3]", "must map layer names to sparsities"),
        ("prune=none;prune.per_layer={conv3: 0.5}", "prune=none does not prune"),
        ("prune.m_by_n=[2,4];prune.sparsity=0.5;prune.per_layer={a: 0.5}", "prune.m_by_n"),
        ("prune=channels;prune.sparsity=0", "prune=channels needs the fraction"),
        ("prune=channels;prune.criterion=l2", "prune.criterion='l2' is invalid: choose from"),
        ("prune=channels;prune.min_channels=0", "prune.min_channels=0"),
        ("cluster=kmeans;cluster.clusters=1", "cluster.clusters=1 is invalid: must be >= 2"),
        ("cluster=kmeans;cluster.preserve_sparsity=true;cluster.clusters=2", "must be >= 3"),
        ("cluster=kmeans;cluster.init=kmeans", "cluster.init='kmeans' is invalid: choose from"),
        ("cluster=kmeans;cluster.scope='conv('", "cluster.scope='conv(' is"),
        ("quant=cqat;model=cauca_cnn_qat", "quant=cqat preserves weight clusters, but"),
        ("quant=cqat;cluster=kmeans;prune.sparsity=0.5;cluster.preserve_sparsity=true", "pcqat"),
        ("quant=pcqat;cluster=kmeans", "quant=pcqat preserves pruned zeros and clusters"),
        ("quant=qat;cluster=kmeans", "quant=qat would undo the weight clusters"),
        ("quant=pqat;prune=channels", "prune=channels makes none: use quant=qat"),
        ("prune=none;cluster=kmeans;cluster.preserve_sparsity=true", "prune=none makes none"),
        ("quant=dynamic;quant.float_layers=[dense1]", "applies to quant=int8 only"),
        ("sensitivity.max_drop=1", "sensitivity.max_drop=1"),
        ("sensitivity.sparsities=[]", "sensitivity.sparsities=[]"),
        ("seed=-1", "seed=-1 is invalid: must satisfy 0 <= seed < 2**32"),
        ("seed=4294967296", "seed=4294967296 is invalid"),
        ("dataset.seed=-1", "dataset.seed=-1 is invalid"),
    ],
)
def test_bad_values_name_the_key(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_cfg(*override.split(";")))


def test_unknown_option_lists_the_valid_ones(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("dataset=imagenet")
    for option in ("synthetic_falls", "cauca", "hds", "digits"):
        assert option in str(e.value)


@pytest.mark.parametrize(
    "override", ["dataset.colour=red", "train.epochs=five", "model.block_order=x"]
)
def test_unknown_key_or_wrong_type_fails_composition(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(override)


def _hash(compose_cfg, *overrides: str) -> str:
    return config_hash(validate(compose_cfg(*overrides)))


def test_config_hash_ignores_tracking_but_not_results(compose_cfg):
    base = _hash(compose_cfg)
    assert base == _hash(compose_cfg, "tracking.experiment=other")
    assert base == _hash(compose_cfg, "threads=1")  # see README, Reproducibility
    assert base != _hash(compose_cfg, "train.epochs=6")
    assert len(base) == 12


@pytest.mark.parametrize(
    ("option", "ignored"),
    [
        (["quant=dynamic"], ["quant.fine_tune_epochs=3"]),  # no QAT fine-tune in dynamic range
        (["quant=dynamic"], ["quant.representative_samples=7"]),  # no calibration either
        (["prune=none"], ["prune.scope=conv", "prune.fine_tune_epochs=5", "prune.power=1"]),
        ([], ["prune.power=2", "prune.initial_sparsity=0.3"]),  # constant sparsity: no curve
        ([], ["dataset.cache_dir=/elsewhere"]),  # where images are cached does not change them
        (["model.block_order=conv_relu"], ["model.bn_momentum=0.5"]),  # no BatchNorm
        ([], ["prune.criterion=bn_gamma", "prune.min_channels=4"]),  # channels only
        (["prune=channels"], ["prune.frequency=3", "prune.power=1"]),  # channels: no schedule
        (["prune.per_layer={dense1: 0.5}"], ["prune.sparsity=0.3", "prune.scope=all"]),
        ([], ["cluster.clusters=8", "cluster.init=linear"]),  # cluster=none
        ([], ["sensitivity.max_drop=0.05"]),  # the sensitivity tool's, not a run's
    ],
)
def test_configs_that_mean_the_same_run_hash_the_same(compose_cfg, option, ignored):
    assert _hash(compose_cfg, *option, *ignored) == _hash(compose_cfg, *option)


@pytest.mark.parametrize(
    "different",
    [
        ["quant=int8", "quant.representative_samples=7"],
        ["quant=qat", "model=cauca_cnn_qat", "quant.fine_tune_epochs=3"],
        ["prune=polynomial", "prune.power=1"],
        ["prune=channels", "prune.criterion=bn_gamma"],
        ["prune.per_layer={dense1: 0.5}"],
        ["cluster=kmeans"],
        ["cluster=kmeans", "cluster.clusters=8"],
        ["quant=int8", "quant.float_layers=[dense1]"],
    ],
)
def test_keys_an_option_uses_still_change_the_hash(compose_cfg, different):
    assert _hash(compose_cfg, *different) != _hash(compose_cfg, *different[:-1])


def test_identity_follows_the_data_not_the_path(compose_cfg, tmp_path, monkeypatch):
    """Replacing a pickle at the same path is a new run; the same file moved is not."""
    from .conftest import cauca_dict, write_pickle

    train, test = tmp_path / "train.pickle", tmp_path / "test.pickle"
    write_pickle(train, cauca_dict(seed=1))
    write_pickle(test, cauca_dict(seed=2))
    args = ["dataset=cauca", f"dataset.train_path={train}", f"dataset.test_path={test}"]
    before = _hash(compose_cfg, *args)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "train.pickle").write_bytes(train.read_bytes())
    args_moved = [args[0], f"dataset.train_path={moved / 'train.pickle'}", args[2]]
    assert _hash(compose_cfg, *args_moved) == before
    write_pickle(train, cauca_dict(seed=3))  # other images at the same path
    assert file_digest(train) != file_digest(moved / "train.pickle")
    assert _hash(compose_cfg, *args) != before

    from fallopt.data import synthetic_falls

    synthetic = _hash(compose_cfg)
    monkeypatch.setattr(synthetic_falls, "GENERATOR_VERSION", synthetic_falls.GENERATOR_VERSION + 1)
    assert _hash(compose_cfg) != synthetic


def test_a_new_results_version_is_a_new_identity(compose_cfg, monkeypatch):
    from fallopt import identity

    before = _hash(compose_cfg)
    monkeypatch.setattr(identity, "RESULTS_VERSION", identity.RESULTS_VERSION + 1)
    assert _hash(compose_cfg) != before


def test_flatten_gives_dotted_keys():
    assert flatten({"train": {"epochs": 5}, "seed": 0, "a": {"b": {"c": [1]}}}) == {
        "train.epochs": 5,
        "seed": 0,
        "a.b.c": [1],
    }


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    # Reports, at exit, whether TensorFlow and MLflow had been imported by then.
    code = (
        "import atexit, runpy, sys;"
        "atexit.register(lambda: print('TENSORFLOW_LOADED=' + str('tensorflow' in sys.modules)));"
        "atexit.register(lambda: print('MLFLOW_LOADED=' + str('mlflow' in sys.modules)));"
        f"sys.argv = ['fallopt.run', *{list(args)!r}];"
        "runpy.run_module('fallopt.run', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [("train.epochs=-1", "train.epochs=-1 is invalid: must be >= 0"), ("seed=-1", "seed=-1 is")],
)
def test_cli_bad_value_exits_2_with_one_line_before_tensorflow(override, message):
    proc = _run_cli(override, "hydra.run.dir=/tmp/fallopt-test-outputs")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "TENSORFLOW_LOADED=False" in proc.stdout
    assert "MLFLOW_LOADED=False" in proc.stdout  # the sweep callback loads it only in sweeps


def test_help_lists_every_group_and_the_config_without_tensorflow():
    proc = _run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for group in ("dataset", "model", "prune", "quant", "tracking", "target", "experiment"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in lines  # Hydra's own listing, complete
    assert "== Config ==" in proc.stdout and "  sparsity: " in proc.stdout  # then the config
    assert "TENSORFLOW_LOADED=False" in proc.stdout and "MLFLOW_LOADED=False" in proc.stdout


def test_cli_unknown_dataset_option_fails_before_tensorflow():
    proc = _run_cli("dataset=nope")
    assert proc.returncode != 0
    assert "Available options in 'dataset'" in proc.stderr
    assert "TENSORFLOW_LOADED=False" in proc.stdout


def test_an_unreachable_tracking_server_fails_fast_before_tensorflow(tmp_path):
    start = time.monotonic()
    proc = _run_cli("tracking.uri=http://127.0.0.1:9", f"hydra.run.dir={tmp_path}/out")
    assert proc.returncode == 2, proc.stderr
    assert "tracking.uri=http://127.0.0.1:9: no tracking server answers" in proc.stdout
    assert "TENSORFLOW_LOADED=False" in proc.stdout
    assert time.monotonic() - start < 60  # MLflow's own retries took about 4 minutes here


def test_verbose_adds_the_trace_to_the_one_line(tmp_path):
    quiet = _run_cli("train.epochs=-1", f"hydra.run.dir={tmp_path}/q")
    loud = _run_cli("train.epochs=-1", "verbose=true", f"hydra.run.dir={tmp_path}/v")
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stdout + quiet.stderr
    assert "Traceback" in loud.stdout + loud.stderr
    assert "train.epochs=-1 is invalid" in loud.stdout + loud.stderr


def _schema_defaults(schema: type) -> dict:
    import dataclasses
    from enum import Enum

    from omegaconf import MISSING

    found = {}
    for f in dataclasses.fields(schema):
        if f.default_factory is not dataclasses.MISSING:
            found[f.name] = f.default_factory()
        elif f.default not in (dataclasses.MISSING, MISSING):
            found[f.name] = f.default
    return {k: v.value if isinstance(v, Enum) else v for k, v in found.items()}


@pytest.mark.parametrize("path", sorted(CONF.glob("*/*.yaml")), ids=lambda p: p.stem)
def test_yaml_sets_only_what_differs_from_its_schema(path):
    """A default lives in one place, the dataclass: a YAML repeating it would hide a change."""
    from omegaconf import OmegaConf

    from fallopt import config, data, models

    found = re.search(r"/schema/(\w+)/(\w+)@_here_", path.read_text())
    if found is None:
        pytest.skip("not an option of a typed group")
    group, name = found.groups()
    schema = {"dataset": data.schemas(), "model": models.schemas()}.get(group, {}).get(name)
    schema = schema or getattr(config, f"{group.capitalize()}Config")
    defaults = _schema_defaults(schema)
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert [k for k, v in raw.items() if k in defaults and v == defaults[k]] == []


@pytest.mark.parametrize(
    "first", ["fallopt.data.images", "fallopt.data.cauca", "fallopt.models.conv", "fallopt.task"]
)
def test_every_source_is_registered_whatever_is_imported_first(first):
    """Importing a data module before fallopt.config once failed (a circular import), and a
    source imported first could have been registered without its own schema."""
    code = (
        f"import {first}; from fallopt import config, data, models; config.register_configs(); "
        "from hydra.core.config_store import ConfigStore; "
        "r = ConfigStore.instance().repo['schema']; "
        "print(sorted(r['dataset']) == sorted(f'{n}.yaml' for n in data.schemas()), "
        "sorted(r['model']) == sorted(f'{n}.yaml' for n in models.schemas()), len(data.schemas()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "7"]
