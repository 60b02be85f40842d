"""Job commands: ``specdit submit | status | results | cancel | jobs | worker``.

Commands parse arguments and call ``cluster``; every failure is one line on stderr and a non-zero exit
code (2 bad spec, 3 Redis unreachable, 4 no such job, 5 model unavailable, 1 other).
Also runnable on its own (fast start, no other command groups): ``python -m cli.jobs worker``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from cli.common import fail
from cli.render import SafeFormatter, markup, plain

# Service log records reach stderr only where a command configures logging (the worker does); the other
# commands report through their one-line messages.
logging.getLogger("specdit").addHandler(logging.NullHandler())

RedisUrl = typer.Option(None, "--redis-url", envvar="SPECDIT_REDIS_URL",
                        help="redis://[:password@]host:port/db (default redis://127.0.0.1:6379/0). "
                             "A password may also come from SPECDIT_REDIS_PASSWORD.")
Prefix = typer.Option(None, "--prefix", envvar="SPECDIT_REDIS_PREFIX", help="Redis key prefix (default specdit:).")


def _guard(fn):
    """Turn every failure into one line and an exit code (no tracebacks unless SPECDIT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import redis

        from cluster.connection import redact, resolve_url
        from cluster.errors import ServiceError

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ServiceError as e:
            fail(str(e), e.exit_code)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            fail(f"lost connection to Redis at {redact(resolve_url(kwargs.get('redis_url')))}: "
                 f"{' '.join(str(e).split())}", 3)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as e:  # noqa: BLE001
            if os.environ.get("SPECDIT_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} "
                 "(set SPECDIT_DEBUG=1 for a traceback)", 1)

    return wrapper


def _queue(redis_url, prefix, **kwargs):
    """The service client (``cluster.client.SpecditRedis``); with worker settings, the worker-side queue."""
    if kwargs:
        from cluster.connection import connect
        from cluster.keys import Keys
        from cluster.queue import JobQueue

        return JobQueue(connect(redis_url), Keys(prefix), **kwargs)
    from cluster.client import SpecditRedis

    return SpecditRedis.connect(redis_url, prefix)


# ------------------------------------------------------------------------------------------------------
def submit(
    spec_file: Optional[Path] = typer.Argument(None, help="Job spec (.yaml/.yml/.json); flags override it."),
    model: Optional[str] = typer.Option(None, help="Model name, e.g. gmm-2d, gmm-16d, mnist-dit."),
    sampler: Optional[str] = typer.Option(None, help="ddpm | speculative | draft_refine"),
    steps: Optional[int] = typer.Option(None, help="Sampling steps S."),
    eta: Optional[float] = typer.Option(None, help="Stochasticity eta in [0, 1]."),
    draft_length: Optional[int] = typer.Option(None, "--draft-length", "-L", help="Draft length L."),
    verify: Optional[str] = typer.Option(None, help="token | block"),
    drafter: Optional[str] = typer.Option(None, help="free | feature | model:<name>"),
    relax: Optional[float] = typer.Option(None, help="Relaxation lambda (0 = exact)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale."),
    refine_mode: Optional[str] = typer.Option(None, "--refine-mode", help="conservative | aggressive"),
    parallel: Optional[int] = typer.Option(None, help="Draft-and-refine parallelism."),
    labels: Optional[str] = typer.Option(None, help="none | uniform | random | fixed:<class>"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", help="Number of samples N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Base seed; sample i uses f(seed, i)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per shard."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Chains sampled together."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory shared by workers."),
    store: Optional[str] = typer.Option(None, "--store", help="What shards store: auto | images | latents | "
                                                              "images+latents (auto: decoded images)."),
    fid_reference: Optional[str] = typer.Option(None, "--fid-ref", help="data:<n>, ref:<name>, or a statistics "
                                                                        ".npz (ours, or ADM-style mu/sigma)."),
    extractor: Optional[str] = typer.Option(None, help="FID features: auto | raw | mnist | inception."),
    no_fid: bool = typer.Option(False, "--no-fid", help="Do not compute FID statistics."),
    baseline: Optional[str] = typer.Option(None, help="Baseline job id for speed-up (default: auto)."),
    name: Optional[str] = typer.Option(None, help="A label for the job."),
    engine: str = typer.Option("local", help="Engine used to check the model (local | ray | synthetic)."),
    check_model: bool = typer.Option(True, "--check-model/--no-check-model",
                                     help="Load the model once to check the name and label range."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Follow progress until the job ends."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the job id."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Submit a generation / FID-evaluation job (idempotent: the same spec is the same job)."""
    _submit(**locals())


@_guard
def _submit(spec_file, model, sampler, steps, eta, draft_length, verify, drafter, relax, cfg_scale, refine_mode,
            parallel, labels, num_samples, seed, shard_size, batch_size, output, store, fid_reference, extractor, no_fid,
            baseline, name, engine, check_model, watch, quiet, redis_url, prefix):
    from cluster.errors import SpecError
    from cluster.paths import resolve_model_path, resolve_sampler_paths
    from cluster.spec import load_spec_file, merge_overrides, spec_from_dict

    data = load_spec_file(spec_file) if spec_file is not None else {}
    overrides = {
        "model": model, "name": name, "labels": labels, "num_samples": num_samples, "base_seed": seed,
        "shard_size": shard_size, "batch_size": batch_size, "output.dir": output, "output.store": store,
        "sampler.sampler": sampler, "sampler.steps": steps, "sampler.eta": eta,
        "sampler.draft_length": draft_length, "sampler.verify": verify, "sampler.drafter": drafter,
        "sampler.relax": relax, "sampler.cfg_scale": cfg_scale, "sampler.refine_mode": refine_mode,
        "sampler.parallel": parallel, "evaluate.fid_reference": fid_reference,
        "evaluate.extractor": extractor, "evaluate.baseline": baseline,
        "evaluate.fid": False if no_fid else None,
    }
    data = merge_overrides(data, overrides)
    if "model" not in data:
        raise SpecError("invalid job spec: model: Field required (give --model or a spec file)")
    if "num_samples" not in data:
        raise SpecError("invalid job spec: num_samples: Field required (give -n or a spec file)")
    spec = spec_from_dict(data)
    spec.job_dir()  # exit 2 now if the output directory leads out of the output root or a file is in the way
    q = _queue(redis_url, prefix)  # reach Redis before the (slower) model check
    if check_model:
        from workers.engine import EngineError, check_cfg_channels, check_labels, check_store, make_engine

        try:
            eng = make_engine(engine)
            info = eng.model_info(resolve_model_path(spec.model), spec.model_options())
            check_labels(spec.labels, info)
            check_store(spec.output.store, info)
            sampler = resolve_sampler_paths(spec.sampler.model_dump(mode="json"))
            eng.check_sampler(sampler)
            check_cfg_channels(sampler, info)
            if sampler["drafter"].startswith("model:"):  # a drafter model must load as well as the target
                eng.model_info(sampler["drafter"].removeprefix("model:"))
        except EngineError as e:
            raise SpecError(f"invalid job spec: {e}") from None
        _warn_fid_dimension(spec, info)
        _check_reference(spec.evaluate.fid_reference if spec.evaluate.fid else None)
    res = q.submit(spec)
    if res.resumed and not res.queued_shards:  # every shard was already done: only the report is missing
        from cluster.aggregator import Aggregator
        from workers.engine import make_engine

        Aggregator(q, make_engine(engine)).finalize(res.job_id)
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


def _warn_fid_dimension(spec, info) -> None:
    """Warn (stderr) when a FID job has fewer samples than its features have dimensions: the covariance is
    then singular and the FID is dominated by its estimation error."""
    from cluster.limits import feature_dim

    if not spec.evaluate.fid:
        return
    name = info.default_extractor if spec.evaluate.extractor == "auto" else spec.evaluate.extractor
    dim = feature_dim(name, info.sample_shape)
    if dim is not None and spec.num_samples < dim:
        typer.echo(f"warning: FID on {spec.num_samples} samples of {dim}-dimensional {name} features: the "
                   "covariance is singular below the feature dimension and the FID is biased", err=True)


def _check_reference(ref: str | None) -> None:
    """An FID reference given as a statistics file must be readable here (the aggregator reads it later)."""
    if ref is None or ref == "auto" or ref.startswith(("data:", "ref:")):
        return
    from cluster.errors import SpecError
    from cluster.paths import resolve_model_path
    from workers.evaluation import load_feature_stats

    try:
        load_feature_stats(resolve_model_path(ref, "fid_reference"))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the spec's fault
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SpecError(f"invalid job spec: fid_reference {ref!r} is not readable FID statistics: {first}") from None


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


@_guard
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
    export: Optional[Path] = typer.Option(None, "--export", help="Also write the job's images to this .npz "
                                          "(arr_0: (N, H, W, 3) uint8 in sample order; ADM/DiT format)."),
    engine: str = typer.Option("local", help="Engine for a 'data:<n>' FID reference (local | ray | synthetic)."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """The report of a finished job: FID, sample count, rounds per sample, efficiency, speed-up."""
    _results(job_id=job_id, as_json=as_json, recompute=recompute, export=export, engine=engine,
             redis_url=redis_url, prefix=prefix)


@_guard
def _results(job_id, as_json, recompute, export, engine, redis_url, prefix):
    from cluster.aggregator import Aggregator
    from cluster.errors import ServiceError
    from cluster.records import JobStatus
    from workers.engine import make_engine

    q = _queue(redis_url, prefix)
    rec = q.get(job_id)
    if export is not None:
        from cluster.export import export_images

        ex = export_images(q, job_id, export)
        typer.echo(f"wrote {ex.path}: arr_0 {ex.shape} uint8" + (", arr_1 labels" if ex.labels else ""),
                   err=as_json)
    agg = Aggregator(q, make_engine(engine))
    retry_aggregation = recompute and rec.status == JobStatus.FAILED and (rec.error or "").startswith(
        "aggregation failed")
    if rec.status in (JobStatus.FAILED, JobStatus.CANCELLED) and not retry_aggregation:
        raise ServiceError(f"job {job_id} {rec.status.value}: {rec.error or 'no report'}")
    report = agg.report(job_id)
    if report is None or recompute:
        done = q.shards_done(job_id)
        if done < rec.num_shards:
            raise ServiceError(f"job {job_id} is {rec.status.value} ({done}/{rec.num_shards} shards done); "
                               f"see 'specdit status {job_id}'")
        report = agg.finalize(job_id, force=True)
        if report is None and agg.requeued:
            s, why = agg.requeued[0]
            raise ServiceError(f"job {job_id}: {len(agg.requeued)} shard file(s) failed verification and were "
                               f"queued again for recomputation (shard {s}: {why}); run a worker, then retry")
        if report is None:
            raise ServiceError(f"job {job_id} is being aggregated by another process; retry in a moment")
    report = agg.attach_baseline(rec, report)  # a baseline may have finished after this job
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
    t.add_row("FID", f(r.get("fid"), "{:.6g}") + (markup(f"  (vs {r['fid_reference']}, {r.get('fid_extractor')})")
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
                                    f"{1000 * w['job_seconds_per_sample']:.2f} ms (job, {len(w['workers'])} workers)")
    b = r.get("baseline")
    t.add_row("speed-up vs DDPM", "-" if not b else f"{b['speedup_rounds']:.2f}x rounds, {b['speedup_wall']:.2f}x wall "
                                                   f"(baseline {markup(b['job_id'])})")
    for k, v in r.get("files", {}).items():
        t.add_row(markup(k), markup(v))
    Console().print(t)


# ------------------------------------------------------------------------------------------------------
def cancel(
    job_id: str = typer.Argument(..., help="Job id."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Cancel a queued or running job (workers drop its shards)."""
    _cancel(job_id=job_id, redis_url=redis_url, prefix=prefix)


@_guard
def _cancel(job_id, redis_url, prefix):
    q = _queue(redis_url, prefix)
    rec = q.cancel(job_id)
    if rec.status.value == "cancelled":
        typer.echo(plain(f"cancelled job {job_id}"))
    else:
        typer.echo(plain(f"job {job_id} is already {rec.status.value}; nothing to cancel"))


def jobs(
    limit: int = typer.Option(50, min=1, help="Most recent jobs to list."),
    as_json: bool = typer.Option(False, "--json"),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """List jobs (newest first) and live workers."""
    _jobs(limit=limit, as_json=as_json, redis_url=redis_url, prefix=prefix)


@_guard
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

    t = Table("job", "name", "model", "sampler", "N", "status", "shards", "submitted")
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
    engine: str = typer.Option("local", help="local (specdit.api in this process) | ray (actor pool) | "
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
    name: Optional[str] = typer.Option(None, help="Worker name (default host-pid-random)."),
    log_level: str = typer.Option("INFO", "--log-level"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="SPECDIT_RAY_ADDRESS",
                                              help="--engine ray: the cluster (host:port; default: a private one)."),
    ray_pool: Optional[str] = typer.Option(None, "--ray-pool", envvar="SPECDIT_RAY_POOL",
                                           help="--engine ray: sample on this named pool ('specdit pool start')."),
    redis_url: Optional[str] = RedisUrl,
    prefix: Optional[str] = Prefix,
):
    """Run a shard worker (plain process; SIGTERM gives the shard in flight back and exits)."""
    _worker(**locals())


@_guard
def _worker(engine, job, device, threads, heartbeat_timeout, max_attempts, max_idle, max_shards, poll_interval,
            name, log_level, ray_address, ray_pool, redis_url, prefix):
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # hostile job text
    logging.basicConfig(level=level, handlers=[handler], force=True)
    from cluster.errors import ServiceError
    from cluster.limits import check_worker_settings
    from cluster.worker import ShardWorker, WorkerOptions
    from workers.engine import EngineError, make_engine

    check_worker_settings(heartbeat_timeout=heartbeat_timeout, max_attempts=max_attempts, threads=threads,
                          poll_interval=poll_interval)
    if device is not None:  # a ray pool's devices live on the cluster: their spelling only is checked here
        from specdit.devices import check_device_name, resolve_device

        try:
            check_device_name(device, allow_auto=True) if engine == "ray" else resolve_device(device)
        except ValueError as e:
            fail(str(e))
    q = _queue(redis_url, prefix, heartbeat_timeout=heartbeat_timeout, max_attempts=max_attempts)
    try:
        kwargs = {"threads": threads} if device is None else {"threads": threads, "device": device}
        if engine == "ray":
            kwargs.update(address=ray_address, pool=ray_pool)
        eng = make_engine(engine, **kwargs)
    except EngineError as e:
        fail(str(e), 2 if "unknown engine" in str(e) else 1)
    w = ShardWorker(q, eng, WorkerOptions(job_id=job, poll_interval=poll_interval, max_idle=max_idle,
                                          max_shards=max_shards), name=name)
    w.install_signal_handlers()
    code = w.run()
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------------------
COMMANDS = {"submit": submit, "status": status, "results": results, "cancel": cancel, "jobs": jobs,
            "worker": worker}


def register(app: typer.Typer) -> None:
    for cmd_name, fn in COMMANDS.items():
        app.command(cmd_name)(fn)


def standalone_app() -> typer.Typer:
    from cli.common import OneLineErrors

    app = typer.Typer(name="specdit", help="specdit job service.", no_args_is_help=True, cls=OneLineErrors,
                      pretty_exceptions_enable=False, add_completion=False)
    register(app)
    return app


if __name__ == "__main__":
    standalone_app()()
