"""Versioned specs: a job id names the spec version and the sampler-arithmetic version, every shard file
records both, and the aggregator never merges shards written under two versions."""
from __future__ import annotations

import numpy as np
import pytest

import cluster.aggregator as aggregator
import cluster.spec as spec_module
from cluster.errors import ServiceError
from cluster.keys import Keys
from cluster.queue import JobQueue
from cluster.spec import SPEC_VERSION, shard_versions, spec_from_dict
from cluster.storage import read_shard, write_shard
from specdit.config import SAMPLER_ARITHMETIC_VERSION
from tests.service_helpers import run_worker, small_spec


def _bump_arithmetic(monkeypatch, version: int) -> None:
    """Pretend this process runs another sampler arithmetic (what a changed library would declare)."""
    monkeypatch.setattr(spec_module, "SAMPLER_ARITHMETIC_VERSION", version)
    monkeypatch.setattr(aggregator, "SAMPLER_ARITHMETIC_VERSION", version)


def test_job_id_changes_with_the_arithmetic_version_only(monkeypatch):
    data = {"model": "gmm-2d", "num_samples": 100}
    before = spec_from_dict(data).job_id
    assert spec_from_dict({**data, "sampler": {"steps": 250, "eta": 1}}).job_id == before  # same spec
    _bump_arithmetic(monkeypatch, SAMPLER_ARITHMETIC_VERSION + 1)
    assert spec_from_dict(data).job_id != before


def test_refine_noise_keeps_the_ids_of_specs_without_it():
    """``sampler.refine_noise`` has the paper's default: specs that omit it (or spell the default) keep their
    ids; coupled noise is another job."""
    data = {"model": "gmm-2d", "num_samples": 100, "sampler": {"sampler": "draft_refine", "steps": 50}}
    before = spec_from_dict(data).job_id
    same = spec_from_dict({**data, "sampler": {**data["sampler"], "refine_noise": "independent"}})
    coupled = spec_from_dict({**data, "sampler": {**data["sampler"], "refine_noise": "coupled"}})
    assert same.job_id == before and coupled.job_id != before
    assert coupled.sampler.refine_noise == "coupled"


def test_shard_files_record_both_versions(tmp_path):
    path = tmp_path / "s.npz"
    write_shard(path, {"indices": np.arange(3)})
    arrays = read_shard(path)
    assert shard_versions(arrays) == (SPEC_VERSION, SAMPLER_ARITHMETIC_VERSION)
    assert shard_versions({"indices": np.arange(3)}) == (2, 1)  # files written before versions were stamped


def test_check_versions_refuses_a_shard_of_another_version():
    aggregator.check_versions("j1", 0, spec_module.version_arrays())  # this process's own: accepted
    other = {**spec_module.version_arrays(), "sampler_arithmetic_version": np.array(SAMPLER_ARITHMETIC_VERSION + 1)}
    with pytest.raises(ServiceError, match="refusing to merge shards of two versions"):
        aggregator.check_versions("j1", 0, other)


def test_shards_of_two_arithmetic_versions_never_merge(redis_env, tmp_path, monkeypatch):
    """One shard written under version v, the rest under v + 1: the job fails its aggregation with a one-line
    reason instead of a report over mixed samples (negative control: all under one version is done)."""
    client, prefix = redis_env
    for mixed, sub in ((False, "same"), (True, "mixed")):
        q = JobQueue(client, Keys(f"{prefix}{sub}:"), heartbeat_timeout=5.0)
        spec = small_spec(tmp_path / sub, n=48, shard=16, evaluate={"fid": False})
        q.submit(spec)
        run_worker(q, max_shards=1)  # shard 0 under this version
        with monkeypatch.context() as m:
            if mixed:
                _bump_arithmetic(m, SAMPLER_ARITHMETIC_VERSION + 1)
            run_worker(q)  # the other shards, then the aggregation (under the bumped version when mixed)
        rec = q.get(spec.job_id)
        if mixed:
            assert rec.status.value == "failed" and "refusing to merge shards of two versions" in rec.error
            assert q.report(spec.job_id) is None
        else:
            assert rec.status.value == "done" and q.report(spec.job_id)["unique_samples"] == 48
