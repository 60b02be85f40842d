"""benchmarks/profile_round.py reports rounds/sample as the mean over its seeds (before: the last seed's
rounds divided by the number of seeds). No timed assertions."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_round.py"


def _module():
    spec = importlib.util.spec_from_file_location("profile_round", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rounds_per_sample_is_the_mean_over_seeds(monkeypatch, capsys):
    mod = _module()
    seen, real = [], mod.run_sampler

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(int(out[1].rounds.sum()))
        return out

    monkeypatch.setattr(mod, "run_sampler", recording)
    rows = mod.main(["--model", "gmm-2d", "--steps", "40", "--cfg-scale", "1", "--drafter", "perturbed:1",
                     "--draft-length", "4", "--seeds", "4", "--threads", "1"])
    spec = rows[1]
    per_seed = seen[-4:]  # the speculative sampler's timed runs (after its warm-up)
    assert len(set(per_seed)) > 1  # seeds differ, so the last one alone is not the mean
    assert spec["rounds"] == sum(per_seed) and spec["rounds_per_sample"] == pytest.approx(sum(per_seed) / 4)
    assert rows[0]["rounds_per_sample"] == 40  # ddpm: one round per step
    assert f"{sum(per_seed) / 4:.1f} rounds/sample, mean over 4 seeds" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--draft-length", "0"], ["--draft-length", "2,x"], ["--steps", "0"],
                                 ["--drafter", "bogus"], ["--seeds", "0"], ["--threads", "-1"]])
def test_bad_options_are_one_line_usage_errors(bad, capsys):
    """Every bad option (a setting SamplerConfig refuses, a malformed list, a count below 1) exits 2 with one
    line naming it, before any sampling (before: SettingError, ZeroDivisionError or RuntimeError tracebacks)."""
    with pytest.raises(SystemExit) as e:
        _module().main(["--drafter", "x0", *bad])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_json_into_a_missing_folder_is_made(tmp_path):
    """--json into a folder that does not exist yet: the folder is made and the rows written (before: a
    FileNotFoundError traceback after the whole run)."""
    import json

    out = tmp_path / "new" / "deeper" / "profile.json"
    rows = _module().main(["--model", "gmm-2d", "--steps", "4", "--cfg-scale", "1", "--drafter", "perturbed:1",
                           "--draft-length", "2", "--seeds", "1", "--threads", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
