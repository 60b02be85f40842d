"""``specdit bench``: every sampler side by side on the same seeds in one run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import check_output_file, one_line_warnings, step_progress, user_errors
from specdit.stability import RERUNS_PER_REPEAT


def _fmt(v, spec=".3f"):
    return "-" if v is None or v != v else format(v, spec)


COLUMNS = ["variant", "rounds/sample", "parallel eff.", "acceptance", "speed-up vs ddpm", "KS to truth", "KS p"]


def _cells(r) -> list[str]:
    return [r.name, _fmt(r.rounds, ".1f"), _fmt(r.efficiency), _fmt(r.acceptance), _fmt(r.speedup_vs_ddpm, ".2f"),
            _fmt(r.ks, ".4f"), _fmt(r.ks_p, ".3g")]


def _table(rows):
    from rich.table import Table

    from cli.render import markup

    table = Table(*COLUMNS)
    for r in rows:
        table.add_row(*(markup(c) for c in _cells(r)))
    return table


def _markdown(rows) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([head, *("| " + " | ".join(_cells(r)) + " |" for r in rows)])


def _write_json(path: Path | None, doc: dict) -> None:
    if path is not None:
        from specdit.outputs import strict_json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(strict_json(doc, indent=2))


def _lengths(text: str) -> tuple[int, ...]:
    """``--draft-lengths``: comma-separated draft lengths, each checked by the draft-length rule. Raises
    SettingError naming ``--draft-lengths`` (not ``--draft-length``, the option of generate)."""
    try:
        lengths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--draft-lengths must be comma-separated integers, got {text!r}") from None
    for L in lengths:
        _as_option("draft_lengths", "draft_length", lambda: opt.sampler_config(draft_length=L))
    return lengths


def _drafters(text: str) -> tuple[str, ...]:
    """``--drafters``: comma-separated drafter specs (blank entries skipped), each checked by the drafter
    rule. Raises SettingError naming ``--drafters`` (not ``--drafter``, the option of generate)."""
    from specdit.config import check_drafter

    drafters = tuple(d.strip() for d in text.split(",") if d.strip())
    for d in drafters:
        _as_option("drafters", "drafter", lambda: check_drafter(d))
    return drafters


def _as_option(option: str, setting: str, check) -> None:
    """Run ``check()``; a SettingError about ``setting`` is raised again naming bench's list option
    ``option`` (``draft_lengths`` -> ``invalid setting --draft-lengths: <reason>``)."""
    from specdit.config import SettingError

    try:
        check()
    except SettingError as e:
        if e.setting != setting:
            raise
        raise SettingError(option, e.reason) from None


MODES = ("table", "latency", "throughput")


def _mode(mode: str) -> str:
    """``--mode`` checked (ValueError naming the option: exit 2); returns it."""
    if mode not in MODES:
        raise ValueError(f"--mode must be table, latency or throughput, got {mode!r}")
    return mode


MODE = typer.Option("table", "--mode", help="table: rounds, acceptance, speed-up vs ddpm and the KS distance to the "
                    "truth per variant | latency: batch 1, chains one at a time, paired per seed, with the cost "
                    "model's predicted speed-up | throughput: samples/s at --throughput-batch, likewise.")
REPEATS = typer.Option(8, "--repeats", min=2, help="latency: seeds; throughput: repeats (paired, order rotated).")
RERUNS = typer.Option(RERUNS_PER_REPEAT, "--reruns", min=0, help="latency/throughput: a contended repeat (a run "
                      "> 10% off its variant's median per unit of work) is rerun whole at most this often (0: never).")
THROUGHPUT_BATCH = typer.Option(64, "--throughput-batch", min=1, help="Batch of --mode throughput.")
AUTO = typer.Option(True, "--auto/--no-auto", help="latency/throughput: add the --draft-length auto variant "
                    "(calibrates first if no calibration is stored).")


# Options that only some --mode values read: parameter name -> those modes.
MODE_ONLY = {"num_samples": ("table",), "labels": ("table",), "batch_size": ("table",), "refine_noise": ("table",),
             **{name: ("latency", "throughput") for name in ("repeats", "reruns", "auto")},
             "throughput_batch": ("throughput",)}


def _warn_mode_unused(ctx: typer.Context, mode: str) -> list[str]:
    """One ``warning:`` line on stderr per option given on the command line that ``--mode`` ``mode`` does not
    read (:data:`MODE_ONLY`), e.g. ``--num-samples has no effect with --mode latency (it applies to --mode
    table)``; defaults are never warned about. Returns the lines printed."""
    lines = []
    for p in ctx.command.params:
        modes = MODE_ONLY.get(p.name)
        source = ctx.get_parameter_source(p.name)
        if modes is None or mode in modes or getattr(source, "name", None) != "COMMANDLINE":
            continue
        name = "/".join(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        lines.append(f"{name} has no effect with --mode {mode} (it applies to --mode {' and '.join(modes)})")
    for line in lines:
        typer.secho(f"warning: {line}", err=True, fg=typer.colors.YELLOW)
    return lines


def bench(
    ctx: typer.Context,
    model: str = typer.Option("gmm-2d", "--model", "-m", help=opt.MODEL_HELP),
    steps: Optional[str] = opt.STEPS,
    num_samples: int = typer.Option(2000, "--num-samples", "-n", help="Samples per variant (same seeds for all)."),
    draft_lengths: str = typer.Option("4,8", "--draft-lengths", help="Comma-separated speculation lengths L."),
    drafters: str = typer.Option("free,perturbed:3", "--drafters", help="Comma-separated drafters (see "
                                 "generate --drafter)."),
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
    refine_noise: Optional[str] = opt.REFINE_NOISE,
    num_heads: Optional[int] = opt.NUM_HEADS,
    weights: Optional[str] = opt.WEIGHTS,
    labels: str = typer.Option("none", "--labels", help=opt.LABELS_HELP + " bench's default is none: the KS "
                               "distance compares with the full (unconditional) distribution."),
    seed: Optional[str] = opt.SEED,
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Chains sampled together."),
    threads: Optional[int] = opt.THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", parser=opt.path_value, help="Also write the rows as JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table (for the README)."),
    device: str = typer.Option("cpu", help="Where the model and the chains live: cpu | cuda | cuda:N."),
    mode: str = MODE,
    repeats: int = REPEATS,
    reruns: int = RERUNS,
    throughput_batch: int = THROUGHPUT_BATCH,
    precision: Optional[str] = opt.PRECISION,
    auto: bool = AUTO,
    progress: bool = opt.PROGRESS,
) -> None:
    """Samplers side by side on the same seeds; ddpm is the reference (speed-up > 1 is faster). See --mode."""
    _warn_mode_unused(ctx, _mode(mode))
    if mode != "table":
        return _timing(model, steps, cfg_scale, cfg_channels, precision, drafters, draft_lengths, mode, repeats,
                       throughput_batch, threads, device, seed, auto, json_out, markdown, num_heads, weights,
                       progress, reruns)
    from rich.console import Console

    from cli.render import markup, plain
    from specdit.bench import bench_model

    base = opt.sampler_config(steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels, precision=precision,
                              refine_noise=refine_noise)
    settings = _table_settings(model, base, num_samples, draft_lengths, drafters, labels, seed, batch_size, threads,
                               device, num_heads, weights, json_out)
    console = Console(width=max(Console().width, 120))

    def start(threads_used: int, curve) -> None:
        console.print(f"[bold]{markup(model)}[/] S={settings.base.steps} N={num_samples} seed={settings.seed} "
                      f"cfg={settings.base.cfg_scale} threads={threads_used}")
        console.print("target batch cost (relative to batch 1): " + markup(curve.describe()))

    # One bar with ETA over every variant's chain-steps (a bench runs for minutes at README sizes).
    with one_line_warnings(), step_progress(settings.chain_steps(), markup(f"bench on {model}"), progress) as step:
        report = bench_model(settings, on_start=start, progress=step,
                             on_row=lambda r: console.print(f"  done: {markup(r.name)} ({r.wall:.1f} s)"))
    console.print(_table(report.rows))
    if markdown:
        print(plain(_markdown(report.rows), one_line=False))
    _write_json(json_out, report.as_dict())


def _table_settings(model, base, num_samples, draft_lengths, drafters, labels, seed, batch_size, threads, device,
                    num_heads, weights, json_out):
    """The table mode's settings from the parsed options (one-line errors from the option checks, the --json
    file's folder included)."""
    from specdit.bench import BenchSettings

    if json_out is not None:
        check_output_file(json_out, "--json file")
    return BenchSettings(model=model, base=base, num_samples=num_samples, draft_lengths=_lengths(draft_lengths),
                         drafters=_drafters(drafters), labels=labels, seed=opt.seed_value(seed), batch_size=batch_size,
                         threads=threads, device=device, num_heads=num_heads, weights=weights)


def _timing(model, steps, cfg_scale, cfg_channels, precision, drafters, draft_lengths, mode, repeats, batch, threads,
            device, seed, auto, json_out, markdown, num_heads, weights, progress, reruns) -> None:
    """--mode latency | throughput: parse, run ``specdit.latency.run_timing_bench``, render. ``progress``: a line
    per finished repeat (no live bar: its redraws would share the cores with the timed runs)."""
    from rich.console import Console

    from cli.bench_timing import render
    from cli.render import markup
    from specdit.devices import resolve_device
    from specdit.latency import BenchPlan, run_timing_bench

    if json_out is not None:
        check_output_file(json_out, "--json file")
    lengths = list(_lengths(draft_lengths))
    base = opt.sampler_config(steps=steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels, precision=precision)
    plan = BenchPlan(model, base, list(_drafters(drafters)), lengths, _mode(mode), repeats, batch, threads,
                     str(resolve_device(device)), opt.seed_value(seed), auto,
                     reruns_per_repeat=reruns,
                     load_options={k: v for k, v in (("num_heads", num_heads), ("weights", weights)) if v is not None}
                     ).check()
    console, notes = Console(width=max(Console().width, 140)), Console(stderr=True)  # progress notes: stderr
    with one_line_warnings():
        report = run_timing_bench(plan, on_note=(lambda text: notes.print(markup(text))) if progress else None)
    render(report, console, markdown)
    _write_json(json_out, report)


def calibrate(
    model: str = typer.Option("mnist-dit", "--model", "-m", help=opt.MODEL_HELP),
    drafter: Optional[str] = opt.DRAFTER,
    steps: Optional[str] = opt.STEPS,
    eta: Optional[str] = opt.ETA,
    verify: Optional[str] = opt.VERIFY,
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
    precision: Optional[str] = opt.PRECISION,
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Chains sampled together (1: latency)."),
    chains: int = typer.Option(4, "--chains", min=1, help="Chains sampled to measure acceptance by timestep."),
    threads: Optional[int] = opt.THREADS,
    device: str = typer.Option("cpu", help="The device that will sample: cpu | cuda | cuda:N."),
) -> None:
    """Measure acceptance by timestep and the cost model here; store the --draft-length auto schedule.

    The schedule is keyed by model, drafter (its weights' hash), device, steps, eta, cfg and cfg channels,
    verification, precision, batch size and torch threads, in $SPECDIT_CACHE/draft-schedules (default ~/.cache/specdit)."""
    from cli.render import plain
    from specdit.autodraft import key_file
    from specdit.calibrate import calibrate as run
    from specdit.calibrate import plan_doubt
    from specdit.devices import resolve_device

    config = opt.sampler_config(drafter=drafter, steps=steps, eta=eta, verify=verify, cfg_scale=cfg_scale,
                                cfg_channels=cfg_channels, precision=precision)
    if drafter is None and model == "mnist-dit":
        config = config.updated(drafter="feature")
    with one_line_warnings():  # a calibration not cached says why in one line
        plan = run(model, config, device=str(resolve_device(device)), batch=batch_size, chains=chains,
                   threads=threads)
    typer.echo(plain(plan.describe()))
    c = plan.costs
    typer.echo(f"cost model: c(1) {1e3 * c.call[min(c.call)]:.2f} ms, drafter d {1e3 * c.draft:.2f} ms/step, "
               f"sampler's own work v {1e3 * c.verify:.2f} ms/round, plain step overhead {1e3 * c.plain:.2f} ms "
               f"({c.threads} thread{'' if c.threads == 1 else 's'})")
    for note in c.notes:
        typer.echo(plain(f"note: {note}"))
    if plan_doubt(plan) is None:
        typer.echo(plain(f"stored {key_file(plan.key)}"))


def register(app: typer.Typer) -> None:
    app.command("bench", cls=opt.AliasedCommand)(user_errors(bench))
    app.command("calibrate", cls=opt.AliasedCommand)(user_errors(calibrate))
