"""Job specs, keys and shard files (no Redis needed)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cluster.errors import CorruptShard, SpecError
from cluster.keys import Keys
from cluster.spec import JobSpec, load_spec_file, merge_overrides, spec_from_dict
from cluster.storage import read_shard, shard_path, write_shard


def test_spec_defaults_and_id_stable():
    a = spec_from_dict({"model": "gmm-2d", "num_samples": 100})
    b = spec_from_dict({"num_samples": 100, "model": "gmm-2d", "sampler": {"sampler": "speculative"}})
    assert a.job_id == b.job_id and a.job_id.startswith("j")
    c = spec_from_dict({"model": "gmm-2d", "num_samples": 101})
    assert c.job_id != a.job_id
    assert a.sampler.steps == 250 and a.labels == "uniform"


@pytest.mark.parametrize("data, needle", [
    ({"model": "gmm-2d", "num_samples": 0}, "num_samples"),
    ({"model": "gmm-2d", "num_samples": -5}, "num_samples"),
    ({"model": "gmm-2d", "num_samples": 10, "sampler": {"sampler": "magic"}}, "sampler.sampler"),
    ({"model": "gmm-2d", "num_samples": 10, "sampler": {"eta": 2.0}}, "sampler.eta"),
    ({"model": "gmm-2d", "num_samples": 10, "sampler": {"drafter": "bogus"}}, "drafter"),
    ({"model": "gmm-2d", "num_samples": 10, "labels": "fixed:x"}, "labels"),
    ({"model": "gmm-2d", "num_samples": 10, "colour": "red"}, "colour"),
    ({"model": "gmm-2d", "num_samples": 10, "base_seed": -1}, "base_seed"),
    ({"model": "", "num_samples": 10}, "model"),
    ({"model": "gmm-2d", "num_samples": 10, "evaluate": {"fid_reference": "data:x"}}, "fid_reference"),
    ({"model": "gmm-2d", "num_samples": 10, "output": {"store": "pixels"}}, "output.store"),
    ({"model": "gmm-2d", "num_samples": 10, "sampler": {"sampler": "draft_refine", "steps": 8, "parallel": 8}},
     "sampler: parallel (8) must be smaller than steps (8)"),
])
def test_invalid_specs_give_one_line(data, needle):
    with pytest.raises(SpecError) as e:
        spec_from_dict(data)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and msg.startswith("invalid job spec")


def test_shard_ranges_cover_exactly():
    s = spec_from_dict({"model": "m", "num_samples": 130, "shard_size": 32})
    assert s.num_shards == 5
    ranges = [s.shard_range(k) for k in range(s.num_shards)]
    assert ranges[0] == (0, 32) and ranges[-1] == (128, 130)
    assert sum(b - a for a, b in ranges) == 130
    with pytest.raises(IndexError):
        s.shard_range(5)


def test_spec_files_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("model: gmm-2d\nnum_samples: 64\nsampler:\n  steps: 20\n")
    (tmp_path / "a.json").write_text(json.dumps({"model": "gmm-2d", "num_samples": 64, "sampler": {"steps": 20}}))
    y = spec_from_dict(load_spec_file(tmp_path / "a.yaml"))
    j = spec_from_dict(load_spec_file(tmp_path / "a.json"))
    assert y == j
    o = spec_from_dict(merge_overrides(load_spec_file(tmp_path / "a.yaml"), {"sampler.steps": 30, "labels": None}))
    assert o.sampler.steps == 30 and o.labels == "uniform"
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse"):
        load_spec_file(tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec_file(tmp_path / "missing.yaml")


def test_baseline_fingerprint_ignores_sampler_kind():
    a = spec_from_dict({"model": "m", "num_samples": 8, "sampler": {"sampler": "ddpm"}})
    b = spec_from_dict({"model": "m", "num_samples": 8, "sampler": {"sampler": "speculative", "draft_length": 4}})
    c = spec_from_dict({"model": "m", "num_samples": 8, "base_seed": 1})
    assert a.baseline_fingerprint() == b.baseline_fingerprint() != c.baseline_fingerprint()


def test_keys_all_under_prefix():
    k = Keys("p:")
    for key in [k.jobs, k.active, k.job("j"), k.stream("j"), k.done("j"), k.worker("w"), k.baseline("f"),
                *k.job_keys("j")]:
        assert key.startswith("p:")


def test_shard_file_roundtrip_and_corruption(tmp_path):
    arrays = {"indices": np.arange(5), "samples": np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32),
              "steps": np.array(7, dtype=np.int64), "name": np.array("raw")}
    p = shard_path(tmp_path, 0, 5)
    digest = write_shard(p, arrays)
    back = read_shard(p, digest)
    assert set(back) == set(arrays) | {"spec_version", "sampler_arithmetic_version"}  # versions stamped
    assert back["steps"].shape == () and str(back["name"]) == "raw"
    np.testing.assert_array_equal(back["samples"], arrays["samples"])
    assert not list(p.parent.glob("*.tmp"))  # no temp file left behind
    with pytest.raises(CorruptShard, match="recorded"):
        read_shard(p, "0" * 64)
    # Flip bytes in the middle of the file: detected (unreadable or checksum), never loaded silently.
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 8] = b"\xff" * 8
    p.write_bytes(bytes(raw))
    with pytest.raises(CorruptShard):
        read_shard(p, digest)
    p.write_bytes(b"garbage")
    with pytest.raises(CorruptShard, match="unreadable"):
        read_shard(p)
    with pytest.raises(CorruptShard, match="missing"):
        read_shard(tmp_path / "nope.npz")


def test_shard_file_rejects_objects(tmp_path):
    with pytest.raises(TypeError):
        write_shard(tmp_path / "x.npz", {"a": np.array([{"x": 1}], dtype=object)})


def test_jobspec_frozen():
    s = JobSpec(model="m", num_samples=3)
    with pytest.raises(Exception):
        s.num_samples = 4  # type: ignore[misc]


def test_labels_depend_only_on_the_index():
    import torch

    from workers.engine import EngineError, ModelInfo, check_labels, labels_for, seeds_for

    seeds = seeds_for(5, 0, 100)
    idx = torch.arange(100)
    for policy in ("uniform", "random", "fixed:3"):
        whole = labels_for(policy, idx, seeds, 10)
        parts = torch.cat([labels_for(policy, idx[a:a + 7], seeds[a:a + 7], 10) for a in range(0, 100, 7)])
        assert torch.equal(whole, parts) and whole.min() >= 0 and whole.max() < 10
    assert labels_for("random", idx, seeds, 10).unique().numel() == 10
    assert labels_for("uniform", idx, seeds, None) is None and labels_for("none", idx, seeds, 10) is None
    with pytest.raises(EngineError, match="out of range"):
        check_labels("fixed:10", ModelInfo("m", (2,), 10, "raw"))
    with pytest.raises(EngineError, match="unconditional"):
        check_labels("fixed:0", ModelInfo("m", (2,), None, "raw"))


def test_worker_entry_point_imports_no_torch():
    """``specdit worker`` starts fast: the job CLI and the cluster modules import torch only when sampling. Of
    the library they import only torch-free modules: the settings (``specdit.config``, which JobSpec embeds) and
    the atomic-write helpers (``specdit.atomic``, shared with the library's own writers)."""
    import subprocess
    import sys

    from cluster.testing import REPO

    code = ("import sys, cli.jobs, cluster.worker, cluster.queue, cluster.aggregator, workers.engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'matplotlib') or "
            "(m.startswith('specdit') and m not in ('specdit', 'specdit.config', 'specdit.atomic'))]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ DiT options, steps, guidance ----
def test_one_step_is_refused_with_the_reason():
    with pytest.raises(SpecError, match="sampler.steps: steps must be >= 2: .* only t = 0") as e:
        spec_from_dict({"model": "gmm-2d", "num_samples": 4, "sampler": {"steps": 1}})
    assert "\n" not in str(e.value)
    assert spec_from_dict({"model": "gmm-2d", "num_samples": 4, "sampler": {"steps": 2}}).sampler.steps == 2


def test_cfg_channels_and_model_options_reach_the_engine_work():
    base = {"model": "mnist-dit", "num_samples": 8, "sampler": {"cfg_scale": 1.5}}
    every = spec_from_dict(base)
    assert every.sampler.cfg_channels is None and every.model_options() == {}
    assert spec_from_dict({**base, "sampler": {"cfg_scale": 1.5, "cfg_channels": "all"}}) == every
    dit3 = spec_from_dict({**base, "sampler": {"cfg_scale": 1.5, "cfg_channels": 3}})
    assert dit3.sampler.cfg_channels == 3 and dit3.sampler.to_dict()["cfg_channels"] == 3
    assert dit3.baseline_fingerprint() != every.baseline_fingerprint()  # a different target distribution
    # the fingerprint of a spec that sets none of the new fields is what it was before they existed
    s = every.sampler
    old = dict(model=every.model, n=8, seed=0, labels="uniform", steps=s.steps, eta=s.eta, cfg=s.cfg_scale)
    assert every.baseline_fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    opts = spec_from_dict({"model": "DiT-XL-2-256x256.pt", "num_samples": 8, "num_heads": 16, "weights": "model"})
    assert opts.model_options() == {"num_heads": 16, "weights": "model"}
    for bad, needle in [({"num_heads": 0}, "num_heads"), ({"weights": "best"}, "weights"),
                        ({"sampler": {"cfg_channels": 0}}, "sampler.cfg_channels")]:
        with pytest.raises(SpecError, match=needle):
            spec_from_dict({"model": "m.pt", "num_samples": 8, **bad})


def test_guidance_of_a_model_that_cannot_be_guided_is_refused_at_submit(tmp_path):
    import argparse

    import torch

    from tests.dit_seeded import dit_state_dict

    def spec(model, cfg=4.0):
        return spec_from_dict({"model": model, "num_samples": 4, "sampler": {"cfg_scale": cfg}})

    with pytest.raises(SpecError, match="sampler.cfg_scale: 'gmm-2d' is an analytic preset") as e:
        spec("gmm-2d")
    assert "\n" not in str(e.value)
    assert spec("gmm-2d", cfg=1.0).sampler.cfg_scale == 1.0  # no guidance: fine
    arch = dict(hidden=384, depth=1, patch=4, in_channels=4, input_size=8, num_classes=10)
    args = argparse.Namespace(model="DiT-S/4", num_classes=10)
    torch.save({"ema": dit_state_dict(0, null_class=False, **arch), "args": args}, tmp_path / "nonull.pt")
    torch.save({"ema": dit_state_dict(0, **arch), "args": args}, tmp_path / "null.pt")
    with pytest.raises(SpecError, match="trained without a null class"):
        spec(str(tmp_path / "nonull.pt"))
    for ok in (str(tmp_path / "null.pt"), "mnist-dit", "synthetic-2d", str(tmp_path / "not-here.pt")):
        assert spec(ok).sampler.cfg_scale == 4.0  # guidable, or not visible here (the worker decides)


def test_local_engine_loads_with_the_spec_model_options(tmp_path):
    """--num-heads reaches the loader through the engine: a DiT width outside DiT's table needs it."""
    import torch

    from tests.dit_seeded import dit_state_dict
    from workers.engine import EngineError, LocalEngine, ShardWork

    arch = dict(hidden=64, depth=1, patch=4, in_channels=1, input_size=8, num_classes=3)
    torch.save(dit_state_dict(0, **arch), tmp_path / "w64.pt")
    s = spec_from_dict({"model": str(tmp_path / "w64.pt"), "num_samples": 2, "num_heads": 4, "evaluate": {"fid": False},
                        "sampler": {"sampler": "ddpm", "steps": 3}})
    engine = LocalEngine()
    with pytest.raises(EngineError, match="pass --num-heads"):
        engine.model_info(s.model)
    assert engine.model_info(s.model, s.model_options()).sample_shape == (1, 8, 8)
    work = ShardWork(model=s.model, sampler=s.sampler.to_dict(), labels=s.labels, base_seed=0,
                     start=0, stop=2, batch_size=2, model_options=s.model_options())
    out = engine.run(work)
    images = out.arrays["images"]  # an image model stores its uint8 images by default (output.store=auto)
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8


@pytest.mark.parametrize("value, shown", [(1.0e20, "1e+20"), ("", "''"), ("abc", "abc"), (2.5, "2.5"), (0, "0")])
def test_integer_field_errors_are_worded_as_setting_errors(value, shown):
    """pydantic's own words ("Unable to parse input string as an integer, exceeded maximum size"; an empty
    value shown as nothing) are replaced by the settings' wording, with the field's range."""
    from cluster.errors import SpecError
    from cluster.spec import spec_from_dict

    with pytest.raises(SpecError) as err:
        spec_from_dict({"model": "gmm-2d", "num_samples": value, "evaluate": {"fid": False}})
    assert str(err.value) == (f"invalid job spec: num_samples: num_samples must be an integer in [1, 100000000], "
                              f"got {shown}")


def test_an_empty_sampler_setting_is_shown_quoted():
    from cluster.errors import SpecError
    from cluster.spec import spec_from_dict

    with pytest.raises(SpecError) as err:
        spec_from_dict({"model": "gmm-2d", "num_samples": 2, "sampler": {"steps": ""}, "evaluate": {"fid": False}})
    assert str(err.value).endswith("sampler.steps: steps must be an integer, got ''"), str(err.value)
