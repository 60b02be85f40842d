"""Recipe of tests/data/dit_loader_sweep.safetensors: DiT's own models.py on every constructor-argument set of
the loader sweep (``tests.dit_seeded.sweep_configs``). NEEDS DiT'S CODE CHECKED OUT; never imported by tests,
never run in CI.

Set-up (outside this repository; no DiT or timm code enters it):

    git clone https://github.com/facebookresearch/DiT /tmp/dit   # commit ed81ce2 was used
    pip install --target /tmp/dit-site --no-deps timm==1.0.31
    PYTHONPATH=/tmp/dit:/tmp/dit-site:. python scripts/dit_loader_sweep.py tests/data/dit_loader_sweep.safetensors

For configuration i it builds ``DiT(**kw)`` (DiT's ``models.py``), checks that its ``state_dict()`` keys and
shapes are those of ``tests.dit_seeded.dit_key_shapes`` (so the tests can rebuild the weights without DiT's
code), fills every entry with ``seeded_tensor(name, shape, seed=i)``, and stores ``c<i>_x`` (2, C, H, W)
(``torch.randn``, generator seed 100 + i), ``c<i>_t`` (2,), ``c<i>_y`` (2,) and ``c<i>_out = model(x, t, y)``
(eval mode, float32, no grad, one thread); the constructor arguments are in the metadata (``configs``).
Configurations diffusers cannot build (mlp_ratio != 4) store no output: the test checks the refusal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def main(out: str) -> None:
    from models import DiT  # DiT's models.py on PYTHONPATH
    from safetensors.torch import save_file

    from tests.dit_seeded import dit_key_shapes, seeded_tensor, sweep_arch, sweep_configs

    torch.set_num_threads(1)
    tensors, configs = {}, sweep_configs()
    for i, kw in enumerate(configs):
        model = DiT(**kw).eval()
        want = dit_key_shapes(**sweep_arch(kw))
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == want, (kw, set(got.items()) ^ set(want.items()))
        model.load_state_dict({k: seeded_tensor(k, v, seed=i) for k, v in got.items()})
        if kw["mlp_ratio"] != 4.0:
            continue
        g = torch.Generator().manual_seed(100 + i)
        x = torch.randn(2, kw["in_channels"], kw["input_size"], kw["input_size"], generator=g)
        t = torch.tensor([3, 999])
        last = kw["num_classes"] if kw["class_dropout_prob"] > 0 else kw["num_classes"] - 1  # null row if any
        y = torch.tensor([0, last])
        with torch.no_grad():
            tensors.update({f"c{i}_x": x, f"c{i}_t": t, f"c{i}_y": y, f"c{i}_out": model(x, t, y).contiguous()})
    dit_dir = Path(sys.modules["models"].__file__).parent
    commit = os.environ.get("DIT_COMMIT") or subprocess.run(  # DIT_COMMIT: for a `git archive` export
        ["git", "-C", str(dit_dir), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    import timm

    meta = {"configs": json.dumps(configs), "dit_commit": commit.strip() or "unknown",
            "timm": timm.__version__, "torch": torch.__version__}
    save_file(tensors, out, metadata=meta)
    print(f"{len(configs)} configurations, {len(tensors) // 4} with outputs -> {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/dit_loader_sweep.safetensors")
