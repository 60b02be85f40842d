"""The DiT loader against DiT's own constructor (issue 20): every constructor argument of DiT's ``models.py``
varied over the values users train with (``tests.dit_seeded.sweep_configs``), loaded from a checkpoint by
specdit and compared with DiT's own forward (``tests/data/dit_loader_sweep.safetensors``, made by
``scripts/dit_loader_sweep.py`` with DiT's code; the weights are rebuilt here from their seeds), together
with the settings specdit reports (class count, null class, learned sigma, shapes)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from specdit.models.dit import load_dit_original
from specdit.models.registry import load_model
from tests.dit_seeded import TABLE_HEADS, dit_state_dict, sweep_arch, sweep_configs

pytestmark = pytest.mark.timeout(300)

REFERENCE = Path(__file__).parent / "data" / "dit_loader_sweep.safetensors"
FLOAT32_REL = 1e-5  # ||ours - DiT|| / ||DiT|| in float32
CONFIGS = sweep_configs()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def reference():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(REFERENCE), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["configs"]) == CONFIGS  # the table the recipe ran is this one
    assert meta["dit_commit"] == "ed81ce2229091fd4ecc9a223645f95cf379d582b"
    return load_file(str(REFERENCE))


def _checkpoint(i: int, kw: dict, folder: Path) -> Path:
    """Configuration i as DiT saves it: a released-layout state dict, or (no null-class row, which the
    weights cannot tell from a class) a train.py checkpoint whose ``args`` name the class count."""
    sd = dit_state_dict(i, **sweep_arch(kw))
    path = folder / f"c{i}.pt"
    if kw["class_dropout_prob"] > 0:
        torch.save(sd, path)
    else:
        torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(
            model="DiT-custom", num_classes=kw["num_classes"])}, path)
    return path


def _heads_option(kw: dict) -> dict:
    """Heads are not in the weights: DiT's table decides for its widths, --num-heads for the others."""
    table = TABLE_HEADS.get(kw["hidden_size"])
    return {} if table == kw["num_heads"] else {"num_heads": kw["num_heads"]}


def _label(kw: dict) -> str:
    diff = {k: v for k, v in kw.items() if v != CONFIGS[0][k]}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "base"


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[_label(kw) for kw in CONFIGS])
def test_loader_reproduces_dit(i, reference, tmp_path):
    kw = CONFIGS[i]
    path = _checkpoint(i, kw, tmp_path)
    if kw["mlp_ratio"] != 4.0:
        with pytest.raises(ValueError, match=f"mlp_ratio {kw['mlp_ratio']:g} .*not supported") as err:
            load_model(str(path), **_heads_option(kw))
        assert "\n" not in str(err.value)
        return
    model = load_model(str(path), **_heads_option(kw))
    c, side = kw["in_channels"], kw["input_size"]
    assert model.sample_shape == (c, side, side)
    assert model.num_classes == kw["num_classes"]
    assert model.has_null_class == (kw["class_dropout_prob"] > 0)
    assert model.learned_sigma == kw["learn_sigma"]
    cfg = model.transformer.config
    assert (cfg.num_layers, cfg.patch_size, cfg.num_attention_heads) == (kw["depth"], kw["patch_size"], kw["num_heads"])
    assert model.hidden_size == kw["hidden_size"]
    x, t, y, want = (reference[f"c{i}_{k}"] for k in ("x", "t", "y", "out"))
    assert _rel(model(x, t, y).eps, want[:, :c]) < FLOAT32_REL
    with torch.no_grad():
        full = model.transformer(x, timestep=t, class_labels=y).sample  # learned-sigma channels included
    assert full.shape == want.shape and _rel(full, want) < FLOAT32_REL


def test_wrong_heads_are_another_network(reference, tmp_path):
    """Negative control: heads change the network but not one tensor shape (base: 4 heads; 2 or 8 load
    without complaint and miss DiT's output)."""
    kw = CONFIGS[0]
    path = _checkpoint(0, kw, tmp_path)
    x, t, y, want = (reference[f"c0_{k}"] for k in ("x", "t", "y", "out"))
    for heads in (2, 8):
        assert _rel(load_dit_original(path, num_heads=heads)(x, t, y).eps, want[:, :4]) > 1e-2


def test_weights_alone_cannot_decide_heads_or_null_class(tmp_path):
    """What the weights cannot say is asked for: a width outside DiT's table needs --num-heads (one line);
    a class table without a null row reads as one class fewer plus the null class unless train.py args give
    num_classes (as ``_checkpoint`` does)."""
    kw = CONFIGS[0]
    with pytest.raises(ValueError, match="pass --num-heads"):
        load_dit_original(_checkpoint(0, kw, tmp_path))
    i = next(j for j, c in enumerate(CONFIGS) if c["class_dropout_prob"] == 0)
    flat = tmp_path / "flat.pt"
    torch.save(dit_state_dict(i, **sweep_arch(CONFIGS[i])), flat)
    model = load_dit_original(flat, num_heads=CONFIGS[i]["num_heads"])
    assert model.num_classes == CONFIGS[i]["num_classes"] - 1 and model.has_null_class


@pytest.mark.parametrize("name", ["class_dropout_prob", "learn_sigma"])
def test_settings_survive_specdit_save_formats(name, reference, tmp_path):
    """A loaded sweep model saved as our safetensors file and as a diffusers folder loads back with the same
    settings and outputs (no null class, no learned sigma)."""
    from specdit.models.dit import load_dit_diffusers, load_dit_safetensors, save_dit_diffusers, save_dit_safetensors

    i = next(j for j, c in enumerate(CONFIGS) if c[name] != CONFIGS[0][name])
    kw = CONFIGS[i]
    model = load_model(str(_checkpoint(i, kw, tmp_path)), **_heads_option(kw))
    save_dit_safetensors(model, tmp_path / "m.safetensors")
    save_dit_diffusers(model, tmp_path / "folder")
    x, t, y, want = (reference[f"c{i}_{k}"] for k in ("x", "t", "y", "out"))
    for again in (load_dit_safetensors(tmp_path / "m.safetensors"), load_dit_diffusers(tmp_path / "folder")):
        assert (again.num_classes, again.has_null_class, again.learned_sigma) == (
            model.num_classes, model.has_null_class, model.learned_sigma)
        if not torch.equal(again.transformer.pos_embed.pos_embed, model.transformer.pos_embed.pos_embed):
            # a diffusers folder keeps no positional table (DiT's is its fixed sin-cos one; the seeded
            # weights' is random): compare the rest of the network
            model.transformer.pos_embed.pos_embed = again.transformer.pos_embed.pos_embed
            want = model(x, t, y).eps
        assert _rel(again(x, t, y).eps, want[:, :kw["in_channels"]]) < FLOAT32_REL
