"""The sweeper's config loader (fallopt.composing.ComposeOnce) against Hydra's own.

Each job's config must be exactly what Hydra composes for it, whatever kinds of overrides it
has; only the number of times Hydra walks the defaults list may differ.
"""

from __future__ import annotations

import pickle

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import OmegaConf

from fallopt.composing import ComposeOnce

from .conftest import CONF

MASTER_OVERRIDES = [
    "hydra.sweep.dir=/tmp/fallopt-compose-test",
    "hydra.job.config.override_dirname.exclude_keys=[seed]",
    "train.epochs=1",  # the command line's own values stay under the jobs'
]


@pytest.fixture(scope="module")
def hydra_loader():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", MASTER_OVERRIDES, RunMode.MULTIRUN)
        yield loader, master


def _same(composed, reference) -> None:
    assert OmegaConf.to_container(composed) == OmegaConf.to_container(reference)
    app = [key for key in reference if key != "hydra"]  # Hydra's resolves only in the job
    assert OmegaConf.to_container(OmegaConf.masked_copy(composed, app), resolve=True) == (
        OmegaConf.to_container(OmegaConf.masked_copy(reference, app), resolve=True)
    )
    assert OmegaConf.is_struct(composed) and OmegaConf.is_struct(reference)
    assert OmegaConf.is_readonly(composed.hydra) == OmegaConf.is_readonly(reference.hydra)


JOBS = {
    "values": (["prune.sparsity=0.5", "seed=3"], 1),
    "a group and values, in any order": (["prune.sparsity=0.8", "quant=int8", "seed=1"], 1),
    "Hydra's own key and values": (["hydra.job.chdir=true", "train.batch_size=16"], 1),
    "an overlay of the whole config": (["+experiment=smoke", "prune.sparsity=0.3"], 1),
    "an added key: left to Hydra": (["+train.note=x", "seed=2"], 1),
    "a deleted key: left to Hydra": (["~seed", "prune.sparsity=0.2"], 1),
    "a dict value: left to Hydra": (["train={epochs:3}", "seed=2"], 1),
    "only a group": (["quant=dynamic"], 1),
}


@pytest.mark.parametrize("job", list(JOBS), ids=list(JOBS))
def test_each_kind_of_override_composes_as_hydra_composes_it(hydra_loader, job):
    loader, master = hydra_loader
    overrides, compositions = JOBS[job]
    once = ComposeOnce(loader)
    _same(once.load_sweep_config(master, overrides), loader.load_sweep_config(master, overrides))
    assert once.full_compositions == compositions


def test_jobs_differing_in_values_share_one_composition_each_kept_for_the_launch(hydra_loader):
    loader, master = hydra_loader
    jobs = [[f"prune.sparsity={s}", f"quant={q}"] for q in ("none", "int8") for s in (0.2, 0.5)]
    once = ComposeOnce(loader)
    checked = [once.load_sweep_config(master, job) for job in jobs]  # the batch check
    launched = [once.load_sweep_config(master, job) for job in jobs]  # the launch
    assert once.full_compositions == 2  # one per quant choice
    for job, config in zip(jobs, launched, strict=True):
        _same(config, loader.load_sweep_config(master, job))
        assert config.prune.sparsity == float(job[0].split("=")[1])
        assert list(config.hydra.overrides.task) == job
        assert config.hydra.job.override_dirname == ",".join(job)
    checked[0].prune.sparsity = 0.9  # the checker's copy is its own
    assert launched[0].prune.sparsity == 0.2
    assert launched[0] is not once.load_sweep_config(master, jobs[0])  # asked again: anew
    assert once.full_compositions == 2


def test_a_bad_value_fails_with_hydras_own_words(hydra_loader):
    loader, master = hydra_loader
    once = ComposeOnce(loader)
    once.load_sweep_config(master, ["prune.sparsity=0.5"])
    bad_jobs = (["prune.sparsty=0.5"], ["prune.sparsity=[oops"], ["quant=nope", "seed=1"],
                ["prune.sparsty=1", "hydra.job.chdr=true"])  # fmt: skip
    for bad in bad_jobs:
        with pytest.raises(Exception) as ours:
            once.load_sweep_config(master, bad)
        with pytest.raises(Exception) as hydras:
            loader.load_sweep_config(master, bad)
        assert (type(ours.value), str(ours.value)) == (type(hydras.value), str(hydras.value))
    with pytest.raises(ConfigCompositionException, match="Could not override 'prune.sparsty'"):
        once.load_sweep_config(master, ["prune.sparsty=0.5"])


def test_what_hydra_reads_from_the_process_is_read_for_each_job(hydra_loader, monkeypatch):
    loader, _ = hydra_loader
    monkeypatch.setenv("FALLOPT_TEST_V", "zero")
    master = loader.load_configuration(
        "config", [*MASTER_OVERRIDES, "hydra.job.env_copy=[FALLOPT_TEST_V]"], RunMode.MULTIRUN
    )
    once = ComposeOnce(loader)
    for seed, value in enumerate(("one", "two")):  # the second reuses the first's defaults
        monkeypatch.setenv("FALLOPT_TEST_V", value)
        job = [f"seed={seed}", "prune.sparsity=0.3"]
        ours, hydras = once.load_sweep_config(master, job), loader.load_sweep_config(master, job)
        _same(ours, hydras)
        assert ours.hydra.job.env_set["FALLOPT_TEST_V"] == value
    assert once.full_compositions == 1


def test_the_loader_ships_to_workers_without_configs(hydra_loader):
    loader, master = hydra_loader
    once = ComposeOnce(loader)
    once.load_sweep_config(master, ["seed=9"])  # kept for a launch that has not come
    assert once.get_sources() == loader.get_sources()  # the rest is the wrapped loader's
    shipped = pickle.loads(pickle.dumps(once))
    assert shipped._composed == {} and not shipped._defaults and shipped.full_compositions == 0
