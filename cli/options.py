"""One command-line vocabulary: each setting has one flag name, one help text and one default, defined here
and shared by every command that takes it; old spellings are hidden, deprecated aliases.

Sampler settings are ``specdit.config.SamplerConfig`` fields, spelled ``--<field with dashes>``
(``cfg_scale`` -> ``--cfg-scale``). Their flags take text and :func:`sampler_config` coerces and validates it
with the library's rules, so a bad value gives the same reason whether it comes from a flag or a job spec
file (``invalid setting --eta: <reason>`` / ``invalid job spec: sampler.eta: <reason>``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from specdit.config import (MAX_STEPS, SAMPLER_ONLY, SamplerConfig, SettingError, as_cfg_channels, as_float, as_int,
                            check_seed, unused_settings)

_D = SamplerConfig()


def flag(setting: str) -> str:
    """The flag of a sampler setting (or of ``seed``): ``cfg_scale`` -> ``--cfg-scale``."""
    return "--" + setting.replace("_", "-")


def _opt(setting: str, metavar: str, help: str, *short: str):
    """A sampler-setting flag (text, coerced by :func:`sampler_config`); its default is SamplerConfig's."""
    default = getattr(_D, setting, None) if setting in SamplerConfig.__dataclass_fields__ else None
    return typer.Option(None, flag(setting), *short, metavar=metavar, help=help,
                        show_default="all" if setting == "cfg_channels" else str(default))


# Sampler settings (``specdit.config.SamplerConfig``); defaults are the config's, shown in the help.
SAMPLER = _opt("sampler", "NAME", f"ddpm | speculative | draft_refine")
STEPS = _opt("steps", "INT", f"Sampling steps S in [2, {MAX_STEPS}]")
ETA = _opt("eta", "FLOAT", f"Stochasticity in [0, 1] (1: DDPM posterior variance, 0: DDIM)")
DRAFT_LENGTH = _opt("draft_length", "INT|auto", "Speculation length L, or auto: a per-timestep schedule L(k) from "
                    "the calibration stored for this model, drafter, device and steps (specdit calibrate)", "-L")
PRECISION = _opt("precision", "NAME", "Networks' precision: fp32 | bf16 (bf16 under autocast; sampler maths "
                                      "stays float64)")
VERIFY = _opt("verify", "NAME", f"Verification: token | block")
DRAFTER = _opt("drafter", "SPEC", "free | x0 (reuse the target's latest x0 estimate: training-free, usually the "
                                  "fastest) | feature | feature:<folder> | perturbed:<error> | model:<name>")
RELAX = _opt("relax", "FLOAT", "Uncertainty-guided relaxation lambda >= 0 (0: exact; 1: the built-in drafters' "
             "parallel efficiency about doubles, quality drops a little)")
CFG_SCALE = _opt("cfg_scale", "FLOAT", f"Classifier-free guidance scale w >= 0 (1: none)")
CFG_CHANNELS = _opt("cfg_channels", "all|INT", "Guided channels: all | 3 (3: the original DiT's forward_with_cfg) "
                                               "")
REFINE_MODE = _opt("refine_mode", "NAME", f"DRiffusion mode: conservative | aggressive")
REFINE_NOISE = _opt("refine_noise", "NAME", "DRiffusion draft noise: independent (the paper's) | coupled "
                                           "(drafts share the refinement's noise; see docs/design.md)")
PARALLEL = _opt("parallel", "INT", f"DRiffusion parallel evaluations k, 1 <= k < steps")


def seed_option(use: str = "sample i uses seed f(seed, i)"):
    """The ``--seed`` flag (text, read by :func:`seed_value`): one range and default, ``use`` says what it seeds."""
    return typer.Option(None, "--seed", metavar="INT", show_default="0", help=f"Base seed in [0, 2^63-1]; {use}.")


SEED = seed_option()

# Model options (``specdit.api.load_model`` keywords).
MODEL_HELP = "Registered model name (gmm-2d, gmm-16d, mnist-dit, ...) or checkpoint path."
NUM_HEADS = typer.Option(None, "--num-heads", min=1, help="Attention heads of an original DiT .pt "
                                                          "(default: DiT's table).")
WEIGHTS = typer.Option(None, "--weights", help="ema | model: weights of a DiT train.py checkpoint (default: ema).")

# Other shared settings.
LABELS_HELP = "Label policy: none | uniform (i mod C) | random | fixed:<class>."
LABELS = typer.Option("uniform", "--labels", help=LABELS_HELP)
def threads_value(value: int | None) -> int | None:
    """``--threads``: a count above this machine's cores is allowed (another machine's setting, say) but warned
    about in one line: threads then share cores, which is slower and makes timings noisy."""
    import os

    cores = os.cpu_count() or 1
    if value is not None and value > cores:
        typer.secho(f"warning: --threads {value} is more than this machine's {cores} cores: threads will share "
                    "cores (slower, and timings get noisy)", err=True, fg=typer.colors.YELLOW)
    return value


THREADS = typer.Option(None, "--threads", min=1, callback=threads_value,
                       help="torch CPU threads (default: torch's choice, one per core; several processes on one "
                       "machine should split the cores between them).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with ETA.")
RAY_ADDRESS_HELP = "Ray cluster address: host:port | ray://host:port | auto (any cluster running here)."

def path_value(text: Any) -> Path:
    """The ``parser`` of every path option and argument: its text as a Path. Empty (or blank) text is refused
    (typer.BadParameter: one usage line, exit 2): Typer would otherwise read ``''`` as ``.``, the current
    directory, and a command would write there. Text that starts with ``=`` is refused too: click reads
    ``-o=x`` as the path ``=x`` (only long options take ``--out=x``)."""
    if isinstance(text, Path):  # a default
        return text
    if not str(text).strip():
        raise typer.BadParameter(f"must not be empty, got {text!r}")
    if str(text).startswith("="):
        raise typer.BadParameter(f"must not start with '=', got {text!r} (write -o PATH or --out=PATH)")
    return Path(text)


# Deprecated spellings, kept for one release: command name -> {old: new}. Hidden from --help; using one
# prints one ``warning:`` line and then works as the new spelling.
DEPRECATED: dict[str, dict[str, str]] = {
    "generate": {"--cfg": "--cfg-scale"},
    "bench": {"--cfg": "--cfg-scale"},
    "submit": {"--output": "--out", "--extractor": "--features"},
    "train-drafter": {"--pool": "--ray-pool"},
    "start": {"--address": "--ray-address", "-n": "--actors"},  # pool start
    "list": {"--address": "--ray-address"},  # pool list
    "stop": {"--address": "--ray-address"},  # pool stop
}


def _attached_short(arg: str, table: dict[str, str]) -> bool:
    """Whether ``arg`` is a deprecated short alias with its value attached (``-n4``; not ``-n=4`` nor ``-n``)."""
    return not arg.startswith("--") and len(arg) > 2 and arg[:2] in table and arg[2] != "="


def rewrite_deprecated(command: str, args: list[str], takes_value: frozenset[str] = frozenset()) -> list[str]:
    """``args`` with the deprecated spellings of ``command`` replaced (``--old=v`` and a short alias's attached
    ``-nV`` too; nothing after ``--``, nor the value of an option in ``takes_value``: ``--name --output`` keeps
    its name); prints
    ``warning: <old> is deprecated; use <new>`` once per spelling used."""
    table, out, warned, is_value = DEPRECATED.get(command, {}), [], set(), False
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        name, eq, value = arg.partition("=")
        if is_value:  # the value of the option before: left as typed
            out.append(arg)
            is_value = False
            continue
        if arg[:2] in takes_value and not arg.startswith("--") and arg[2:3] == "=":
            # click reads "-o=x" as the value "=x" (only long options take "--out=x"): refuse, for every command
            raise typer.BadParameter(f"{arg[:2]}= is not an option spelling: write {arg[:2]} VALUE or the long "
                                     "form --name=VALUE")
        if _attached_short(arg, table):  # "-n4": a short alias with its value attached, read as "-n=4"
            name, eq, value = arg[:2], "=", arg[2:]
        if name in table:
            if name not in warned:
                typer.secho(f"warning: {name} is deprecated; use {table[name]}", err=True, fg=typer.colors.YELLOW)
                warned.add(name)
            arg = table[name] + eq + value
        is_value = not eq and table.get(name, name) in takes_value
        out.append(arg)
    return out


class AliasedCommand(TyperCommand):
    """A command that accepts its deprecated spellings (:data:`DEPRECATED`) with a one-line note."""

    def parse_args(self, ctx, args):
        takes_value = frozenset(o for p in self.params if p.param_type_name == "option"
                                and not p.is_flag and not p.count for o in p.opts)
        return super().parse_args(ctx, rewrite_deprecated(self.name or "", list(args), takes_value))


def _coerce(setting: str, value: Any) -> Any:
    value = as_spec_value(value)  # "5.0" is 5 as in a spec file's YAML (and as --seed reads it)
    if setting in ("steps", "draft_length", "parallel"):
        return as_int(setting, value)
    if setting in ("eta", "relax", "cfg_scale"):
        return as_float(setting, value)
    if setting == "cfg_channels":
        return as_cfg_channels(value)
    return value


def coerce_flags(**flags: Any) -> dict[str, Any]:
    """The sampler-setting flags that were given (not None), as typed values. Raises SettingError (a wrong
    type, NaN, inf): the error wrapper names the flag."""
    return {k: _coerce(k, v) for k, v in flags.items() if v is not None}


def warn_unused(sampler: str, **flags: Any) -> list[str]:
    """Print one ``warning:`` line on stderr for each sampler-setting flag given (not None) that ``sampler``
    does not read (``specdit.config.unused_settings``): ``generate --sampler ddpm --drafter x0`` warns
    ``--drafter has no effect with the ddpm sampler (it applies to --sampler speculative)``. A warning, not a
    refusal: the run is well defined, and a spec file may carry a default the flag repeats. Returns the
    lines printed."""
    lines = [f"{flag(n)} has no effect with the {sampler} sampler (it applies to --sampler {SAMPLER_ONLY[n]})"
             for n in unused_settings(sampler, [k for k, v in flags.items() if v is not None and v is not False])]
    for line in lines:
        typer.secho(f"warning: {line}", err=True, fg=typer.colors.YELLOW)
    return lines


def split_auto(draft_length: str | None) -> tuple[str | None, bool]:
    """(the draft-length flag without ``auto``, whether ``auto`` was asked for)."""
    if isinstance(draft_length, str) and draft_length.strip().lower() == "auto":
        return None, True
    return draft_length, False


def sampler_config(base: SamplerConfig | None = None, **flags: Any) -> SamplerConfig:
    """``base`` (default: the defaults) with the sampler-setting flags that were given (not None), coerced and
    validated by the library's rules. Raises SettingError: the caller's error wrapper names the flag."""
    return (base or SamplerConfig()).updated(**coerce_flags(**flags))


def as_spec_value(text: Any) -> Any:
    """Flag text read as a job spec file's YAML reads the same scalar, so that a refused value is worded the
    same on both surfaces: text with a dot that parses as a number is that float (``"1.5"`` -> 1.5); any other
    text stays text (YAML 1.1 keeps ``"1e5"`` a string), for the setting's rule to coerce or refuse."""
    if isinstance(text, str) and "." in text:
        try:
            return float(text)
        except ValueError:
            pass
    return text


def seed_value(value: Any, default: int = 0) -> int:
    """A ``--seed`` flag (text) as an int in [0, 2^63-1] (SettingError otherwise): the one seed rule of every
    command (``specdit.config.check_seed``)."""
    return default if value is None else check_seed(as_spec_value(value))


def setting_error_line(e: SettingError) -> str:
    """The one-line message of a refused flag value: ``invalid setting --eta: <reason>``."""
    return f"invalid setting {flag(e.setting)}: {e.reason}" if e.setting else f"invalid settings: {e.reason}"
