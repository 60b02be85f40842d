"""Job commands: ``specdit submit | status | results | cancel | jobs | worker``.

Commands parse arguments and call ``cluster``; every failure is one line on stderr and a non-zero exit
code (2 bad spec, 3 Redis unreachable, 4 no such job, 5 model unavailable, 7 Redis refusing, 1 other).
Also runnable on its own (fast start, no other command groups): ``python -m cli.jobs worker``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from cli import options as opt
from cli.common import user_errors
from cli.render import SafeFormatter, markup, plain

# Service log records reach stderr only where a command configures logging (the worker does); the other
# commands report through their one-line messages.
logging.getLogger("specdit").addHandler(logging.NullHandler())

RedisUrl = typer.Option(None, "--redis-url", envvar="SPECDIT_REDIS_URL",
                        help="redis://[:password@]host:port/db (default redis://127.0.0.1:6379/0). "
                             "A password may also come from SPECDIT_REDIS_PASSWORD.")
Prefix = typer.Option(None, "--prefix", envvar="SPECDIT_REDIS_PREFIX", help="Redis key prefix (default specdit:).")


def _queue(redis_url, prefix):
    """The service client (``cluster.client.SpecditRedis``)."""
    from cluster.client import SpecditRedis

    return SpecditRedis.connect(redis_url, prefix)


# ------------------------------------------------------------------------------------------------------
_OUT = typer.Option(None, "--out", "-o", help="Output directory shared by workers, relative to SPECDIT_OUTPUT_ROOT "
                    "[default: jobs].")
_STORE = typer.Option(None, "--store", help="What shards store: auto | images | latents | images+latents (auto: "
                      "decoded images).")
_FID_REF = typer.Option(None, "--fid-ref", help="data:<n>, ref:<name>, or a statistics .npz (ours, or ADM-style "
                        "mu/sigma).")
_FEATURES = typer.Option(None, "--features", "-f", help="FID features: auto | raw | mnist | inception [default: auto].")


def submit(
    spec_file: Optional[Path] = typer.Argument(None, parser=opt.path_value,
                                               help="Job spec (.yaml/.yml/.json); flags override it."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=opt.MODEL_HELP),
    sampler: Optional[str] = opt.SAMPLER,
    steps: Optional[str] = opt.STEPS,
    eta: Optional[str] = opt.ETA,
    draft_length: Optional[str] = opt.DRAFT_LENGTH,
    verify: Optional[str] = opt.VERIFY,
    drafter: Optional[str] = opt.DRAFTER,
    relax: Optional[str] = opt.RELAX,
    cfg_scale: Optional[str] = opt.CFG_SCALE,
    cfg_channels: Optional[str] = opt.CFG_CHANNELS,
    refine_mode: Optional[str] = opt.REFINE_MODE,
    refine_noise: Optional[str] = opt.REFINE_NOISE,
    parallel: Optional[str] = opt.PARALLEL,
    precision: Optional[str] = opt.PRECISION,
    num_heads: Optional[int] = opt.NUM_HEADS,
    weights: Optional[str] = opt.WEIGHTS,
    labels: Optional[str] = typer.Option(None, "--labels", help=opt.LABELS_HELP + " [default: uniform]"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Number of samples N."),
    seed: Optional[str] = opt.SEED,
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per shard [default: 64]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Chains sampled together [default: 64]."),
    out: Optional[str] = _OUT,
    store: Optional[str] = _STORE,
    fid_reference: Optional[str] = _FID_REF,
    features: Optional[str] = _FEATURES,
    no_fid: bool = typer.Option(False, "--no-fid", help="Do not compute FID statistics."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline job id for speed-up "
                                                                    "(default: auto)."),
    name: Optional[str] = typer.Option(None, "--name", help="A label for the job."),
    engine: str = typer.Option("local", "--engine", help="Engine used to check the model (local | ray | "
                                                         "synthetic)."),
    check_model: bool = typer.Option(True, "--check-model/--no-check-model",
                                     help="Load the model once to check the name and label range."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow progress until the job ends."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the job id."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Submit a generation / FID-evaluation job (idempotent: the same spec is the same job)."""
    from cluster.submission import submit_job

    draft_length, auto = opt.split_auto(draft_length)
    flags = opt.coerce_flags(sampler=sampler, steps=steps, eta=eta, draft_length=draft_length, verify=verify,
                             drafter=drafter, relax=relax, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                             refine_mode=refine_mode, parallel=parallel, precision=precision,
                             refine_noise=refine_noise)
    overrides = {
        "model": model, "name": name, "labels": labels, "num_samples": num_samples,
        "base_seed": None if seed is None else opt.seed_value(seed), "num_heads": num_heads, "weights": weights,
        "shard_size": shard_size, "batch_size": batch_size, "output.dir": out, "output.store": store,
        "evaluate.fid_reference": fid_reference, "evaluate.extractor": features, "evaluate.baseline": baseline,
        "evaluate.fid": False if no_fid else None,
    }
    spec = _spec(spec_file, flags, overrides, auto, quiet)
    q = _queue(redis_url, prefix)  # reach Redis before the (slower) model check
    _show_submitted(q, spec, submit_job(q, spec, engine_name=engine, check_model=check_model), quiet, watch)


def _spec(spec_file, flags: dict, overrides: dict, auto: bool, quiet: bool):
    """The validated job spec; ``auto``: with the stored ``--draft-length auto`` schedule in it (one line says
    what it chose). A sampler flag the spec's sampler does not read gets one ``warning:`` line each
    (``cli.options.warn_unused``; before auto may pick the plain sampler)."""
    from cluster.submission import spec_from_sources, with_auto_schedule

    spec = spec_from_sources(spec_file, flags, overrides)
    given = {k: v for k, v in flags.items() if k != "sampler"} | ({"draft_length": "auto"} if auto else {})
    opt.warn_unused(spec.sampler.sampler, **given)
    if auto:
        spec, note = with_auto_schedule(spec)
        if not quiet:
            typer.echo(plain(note))
    return spec


def _show_submitted(q, spec, done, quiet: bool, watch: bool) -> None:
    """Print a submission's warnings and outcome (``--quiet``: the job id only); ``--watch``: follow the job."""
    for w in done.warnings:
        typer.echo(plain(f"warning: {w}"), err=True)
    res = done.result
    if quiet:
        typer.echo(res.job_id)
    elif res.created:
        typer.echo(plain(f"submitted job {res.job_id}: {spec.num_samples} samples of {spec.model} "
                         f"({spec.sampler.sampler}) in {spec.num_shards} shards; outputs in {spec.job_dir()}"))
    elif res.resumed:
        typer.echo(plain(f"resumed job {res.job_id}: {res.queued_shards} unfinished shard(s) queued again"))
    else:
        typer.echo(f"job {res.job_id} already exists ({res.status.value}); nothing submitted")
    if watch:
        _watch(q, res.job_id)


# ------------------------------------------------------------------------------------------------------
def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _status_renderable(p):
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    rec = p.record
    n = rec.spec.num_samples
    t = Table.grid(padding=(0, 1))
    t.add_column(overflow="fold", min_width=len(rec.id))  # the job id stays whole (users copy it), never cut
    colour = {"done": "green", "failed": "red", "cancelled": "yellow"}.get(rec.status.value, "cyan")
    head = f"[bold]{markup(rec.id)}[/bold]" + (f" ({markup(rec.spec.name)})" if rec.spec.name else "")
    t.add_row(head, f"[{colour}]{rec.status.value}[/{colour}]", ProgressBar(total=1.0, completed=p.fraction, width=30),
              f"{100 * p.fraction:5.1f}%")
    rate = f"{p.samples_per_second:.1f} samples/s" if p.samples_per_second else "- samples/s"
    info = (f"{p.samples_done}/{n} samples  {p.shards_done}/{rec.num_shards} shards  {rate}  "
            f"ETA {_fmt_secs(p.eta_seconds)}")
    out = Table.grid()
    out.add_row(t)
    out.add_row(info)
    if p.errors and not rec.status == rec.status.DONE:
        last = sorted(p.errors.items())[-1]
        out.add_row(f"[yellow]{len(p.errors)} shard(s) retried; last error (shard {last[0]}): "
                    f"{markup(last[1])}[/yellow]")
    if rec.error and rec.status.value != "done":
        out.add_row(f"[red]{markup(rec.error)}[/red]")
    return out


def _watch(q, job_id: str, interval: float = 1.0) -> None:
    """Follow a job until it ends; a failed or cancelled job makes the command fail (exit 1)."""
    from rich.console import Console
    from rich.live import Live

    from cluster.errors import ServiceError

    with Live(_status_renderable(q.progress(job_id)), console=Console(), refresh_per_second=4) as live:
        while True:
            p = q.progress(job_id)
            live.update(_status_renderable(p))
            if p.record.status.terminal:
                break
            if p.shards_done == p.record.num_shards and (p.record.error or "").startswith("aggregation failed"):
                break
            time.sleep(interval)
    if p.record.status.value != "done":
        raise ServiceError(f"job {job_id} {p.record.status.value}: {p.record.error or ''}".rstrip(": "))


def status(
    job_id: str = typer.Argument(..., help="Job id (from 'specdit submit' or 'specdit jobs')."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the job ends."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Progress of a job: bar, shards done, samples/s, ETA."""
    _status(job_id=job_id, watch=watch, as_json=as_json, redis_url=redis_url, prefix=prefix)


def _status(job_id, watch, as_json, redis_url, prefix):
    q = _queue(redis_url, prefix)
    if watch and not as_json:
        _watch(q, job_id)
        return
    p = q.progress(job_id)
    if as_json:
        typer.echo(json.dumps({
            "job_id": job_id, "status": p.record.status.value, "num_samples": p.record.spec.num_samples,
            "samples_done": p.samples_done, "samples_in_flight": p.samples_in_flight,
            "shards_done": p.shards_done, "num_shards": p.record.num_shards,
            "samples_per_second": p.samples_per_second, "eta_seconds": p.eta_seconds,
            "attempts": p.attempts, "errors": {str(k): v for k, v in p.errors.items()}, "error": p.record.error,
        }))
        return
    from rich.console import Console

    Console().print(_status_renderable(p))


# ------------------------------------------------------------------------------------------------------
def results(
    job_id: str = typer.Argument(..., help="Job id."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON."),
    recompute: bool = typer.Option(False, "--recompute", help="Aggregate the shards again."),
    export: Optional[Path] = typer.Option(None, "--export", parser=opt.path_value,
                                          help="Also write the job's images to this .npz "
                                          "(arr_0: (N, H, W, 3) uint8 in sample order; ADM/DiT format)."),
    engine: str = typer.Option("local", help="Engine for a 'data:<n>' FID reference (local | ray | synthetic)."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """The report of a finished job: FID, sample count, rounds per sample, efficiency, speed-up."""
    _results(job_id=job_id, as_json=as_json, recompute=recompute, export=export, engine=engine,
             redis_url=redis_url, prefix=prefix)


def _results(job_id, as_json, recompute, export, engine, redis_url, prefix):
    from cluster.results import job_report

    q = _queue(redis_url, prefix)
    if export is not None:
        from cluster.export import export_images

        ex = export_images(q, job_id, export)  # NotExportable: a usage error (exit 2)
        typer.echo(f"wrote {ex.path}: arr_0 {ex.shape} uint8" + (", arr_1 labels" if ex.labels else ""),
                   err=as_json)
    report = job_report(q, job_id, recompute=recompute, engine_name=engine)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt="{:.4g}"):
        return "-" if v is None else fmt.format(v)

    t = Table(title=markup(f"job {r['job_id']}" + (f" ({r['name']})" if r.get("name") else "")), show_header=False)
    s = r["sampler"]
    t.add_row("model / sampler", markup(f"{r['model']} / {s['sampler']} (S={s['steps']}, L={s['draft_length']}, "
                                        f"{s['verify']}, drafter {s['drafter']}, eta {s['eta']})"))
    t.add_row("samples", f"{r['unique_samples']} / {r['num_samples']} in {r['num_shards']} shards")
    ref, resolved = r.get("fid_reference"), r.get("fid_reference_resolved")
    ref = f"{ref} = {resolved}" if ref == "auto" and resolved else ref  # say what "auto" stood for
    t.add_row("FID", f(r.get("fid"), "{:.6g}") + (markup(f"  (vs {ref}, {r.get('fid_extractor')})")
                                                  if r.get("fid") is not None else ""))
    isc = r.get("inception_score")
    if isc:
        t.add_row("Inception Score", f"{isc['value']:.4f}  ({isc['classifier']}, one split of {isc['n']})")
    sp = r.get("speed")
    if sp:
        t.add_row("rounds / sample", f"{sp['rounds_per_sample']:.3f} ± {sp['rounds_std']:.3f}")
        t.add_row("parallel efficiency", f(sp["parallel_efficiency"], "{:.3f}") + " steps / round")
        t.add_row("acceptance", f(sp["acceptance"], "{:.3f}"))
        t.add_row("target evals / sample", f"{sp['target_evals_per_sample']:.1f}")
        if sp.get("draft_fallbacks"):  # drafter outputs replaced by the fallback proposal (still exact)
            t.add_row("draft fallbacks", f"{sp['draft_fallbacks']} (non-finite or too large drafts replaced)")
    w = r["wall_time"]
    t.add_row("wall time / sample", f"{1000 * w['engine_seconds_per_sample']:.2f} ms (engine), "
                                    f"{1000 * w['job_seconds_per_sample']:.2f} ms (job, {_plural(len(w['workers']), 'worker')})")
    b = r.get("baseline")
    t.add_row("speed-up vs DDPM", "-" if not b else f"{b['speedup_rounds']:.2f}x rounds, {b['speedup_wall']:.2f}x wall "
                                                   f"(baseline {markup(b['job_id'])})")
    t.columns[1].overflow = "fold"  # ids in the values must stay whole to be copied: fold, never "…"
    Console().print(t)
    for k, v in r.get("files", {}).items():  # outside the table: a path of any length prints whole, on one line
        typer.echo(plain(f"{k}: {v}"))


def _plural(n: int, word: str) -> str:
    """``"1 worker"``, ``"2 workers"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


# ------------------------------------------------------------------------------------------------------
def cancel(
    job_id: str = typer.Argument(..., help="Job id."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Cancel a queued or running job (workers drop its shards)."""
    _cancel(job_id=job_id, redis_url=redis_url, prefix=prefix)


def _cancel(job_id, redis_url, prefix):
    q = _queue(redis_url, prefix)
    rec = q.cancel(job_id)
    if rec.status.value == "cancelled":
        typer.echo(plain(f"cancelled job {job_id}"))
    else:
        typer.echo(plain(f"job {job_id} is already {rec.status.value}; nothing to cancel"))


def jobs(
    limit: int = typer.Option(50, min=1, help="Most recent jobs to list."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: one JSON list of jobs (no worker line)."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """List jobs (newest first) and live workers."""
    _jobs(limit=limit, as_json=as_json, redis_url=redis_url, prefix=prefix)


def _jobs(limit, as_json, redis_url, prefix):
    q = _queue(redis_url, prefix)
    recs = q.jobs(limit)
    if as_json:
        typer.echo(json.dumps([{"job_id": r.id, "name": r.spec.name, "model": r.spec.model,
                                "sampler": r.spec.sampler.sampler, "num_samples": r.spec.num_samples,
                                "status": r.status.value, "submitted_at": r.submitted_at} for r in recs]))
        return
    from rich.console import Console
    from rich.table import Table

    from rich.table import Column

    # the id is what users copy into 'specdit status' (and the model into 'submit'): never cut to "j3dde78…"
    t = Table(Column("job", no_wrap=True, min_width=len(recs[0].id) if recs else None),
              *(Column(h, overflow="fold") for h in ("name", "model", "sampler", "N", "status", "shards", "submitted")))
    for r in recs:
        done = q.shards_done(r.id)
        t.add_row(markup(r.id), markup(r.spec.name or ""), markup(r.spec.model), r.spec.sampler.sampler,
                  str(r.spec.num_samples),
                  r.status.value, f"{done}/{r.num_shards}", time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted_at)))
    c = Console()
    c.print(t)
    ws = q.workers()
    c.print(f"{len(ws)} live worker(s)" + (": " + ", ".join(markup(w.get("name", "?")) for w in ws) if ws else ""))


# ------------------------------------------------------------------------------------------------------
def worker(
    engine: str = typer.Option("local", "--engine", help="local (specdit.api in this process) | ray (actor pool) | "
                                                        "synthetic (no model, for testing the service)."),
    job: Optional[str] = typer.Option(None, "--job", help="Serve only this job; exit when it ends."),
    device: Optional[str] = typer.Option(None, help="Torch device for the engine (default: the engine's)."),
    threads: int = typer.Option(1, help="Torch threads per worker (1: one core each)."),
    heartbeat_timeout: float = typer.Option(30.0, "--heartbeat-timeout",
                                            help="Seconds without heartbeat before a shard is reclaimed."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Starts of a shard before its job fails."),
    max_idle: Optional[float] = typer.Option(None, "--max-idle", help="Exit after this many idle seconds."),
    max_shards: Optional[int] = typer.Option(None, "--max-shards", help="Exit after this many shards."),
    poll_interval: float = typer.Option(0.25, "--poll-interval", help="Seconds between polls when idle."),
    redis_retry: float = typer.Option(300.0, "--redis-retry", help="Seconds to keep retrying while Redis is "
                                      "unreachable or refuses writes (OOM, READONLY, ...) before exiting "
                                      "(exit 3 or 7)."),
    name: Optional[str] = typer.Option(None, help="Worker name (default host-pid-random)."),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG | INFO | WARNING | ERROR."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="SPECDIT_RAY_ADDRESS",
                                              help="--engine ray: the cluster (host:port; default: a private one)."),
    ray_pool: Optional[str] = typer.Option(None, "--ray-pool", envvar="SPECDIT_RAY_POOL",
                                           help="--engine ray: sample on this named pool ('specdit pool start')."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Run a shard worker (plain process; SIGTERM gives the shard in flight back and exits)."""
    _worker(**locals())


def _worker(engine, job, device, threads, heartbeat_timeout, max_attempts, max_idle, max_shards, poll_interval,
            redis_retry, name, log_level, ray_address, ray_pool, redis_url, prefix):
    from cluster.serve import WorkerSettings, serve

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # hostile job text
    logging.basicConfig(level=level, handlers=[handler], force=True)
    settings = WorkerSettings(engine=engine, job=job, device=device, threads=threads,
                              heartbeat_timeout=heartbeat_timeout, max_attempts=max_attempts, max_idle=max_idle,
                              max_shards=max_shards, poll_interval=poll_interval, redis_retry=redis_retry, name=name,
                              ray_address=ray_address, ray_pool=ray_pool, redis_url=redis_url, prefix=prefix)
    raise typer.Exit(serve(settings))


# ------------------------------------------------------------------------------------------------------
COMMANDS = {"submit": submit, "status": status, "results": results, "cancel": cancel, "jobs": jobs,
            "worker": worker}


def register(app: typer.Typer) -> None:
    for cmd_name, fn in COMMANDS.items():
        app.command(cmd_name, cls=opt.AliasedCommand)(user_errors(fn))


def standalone_app() -> typer.Typer:
    from cli.common import OneLineErrors

    app = typer.Typer(name="specdit", help="specdit job service.", no_args_is_help=True, cls=OneLineErrors,
                      pretty_exceptions_enable=False, add_completion=False)
    register(app)
    return app


if __name__ == "__main__":
    standalone_app()()
