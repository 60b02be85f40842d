"""``specdit pool start | list | stop``: the verifier/drafter actor pool on an existing Ray cluster.

Start a cluster first (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1
--port=6380 --num-cpus=2`` locally, Ray's single-machine mode with every listener on 127.0.0.1, or the compose
services), then ``specdit pool start main --ray-address 127.0.0.1:6380``; workers attach with
``specdit worker --engine ray --ray-address 127.0.0.1:6380 --ray-pool main``. There is no default address: a
command never attaches to whatever Ray cluster runs on the machine unless told to (``--ray-address auto``).
The old spellings ``--address`` and ``pool start -n`` are deprecated aliases.
"""
from __future__ import annotations

import json
from typing import Optional

import typer

from cli import options as opt
from cli.common import user_errors
from cli.render import markup, plain

pool_app = typer.Typer(help="The Ray actor pool (verifier + drafter on separate devices).", no_args_is_help=True)

Address = typer.Option(..., "--ray-address", envvar="SPECDIT_RAY_ADDRESS", show_default=False,
                       help="Ray cluster address: host:port | ray://host:port | auto (any cluster running here).")


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Column, Table

    # The same table after start and for list. Names users copy (pool, actor) stay whole on one line; the
    # other cells fold, never "…".
    whole = [Column(h, no_wrap=True, min_width=max(len(str(r.get(h) or "")) for r in rows) if rows else None)
             for h in ("pool", "actor")]
    t = Table(*whole, *(Column(h, overflow="fold") for h in ("role", "device", "threads", "host", "pid")))
    for r in rows:
        dev = r["device"] if r["device"] == "cpu" else f"{r['device']} ({r['device_name']}, "\
                                                       f"CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']})"
        t.add_row(*(markup(v) for v in (r.get("pool", ""), r.get("actor") or "", r["role"], dev, r["threads"],
                                        r["host"], r["pid"])))
    Console().print(t)


@pool_app.command("start", cls=opt.AliasedCommand)
@user_errors
def start(
    name: str = typer.Argument("specdit", help="Pool name (actors are named <name>-<rank>-<role>)."),
    address: str = Address,
    actors: int = typer.Option(2, "--actors",
                               help="Actors: (verifier, drafter) pairs; a single actor holds both roles."),
    threads: int = typer.Option(1, help="CPU threads per actor (CPU actors)."),
    device: str = typer.Option("auto", help="auto (GPUs if the cluster has enough) | cpu | cuda."),
):
    """Start a named, detached pool; it lives until 'specdit pool stop'."""
    from workers.ray_pool.actors import start_pool

    _table(start_pool(address, name, actors, threads, device))


@pool_app.command("list", cls=opt.AliasedCommand)
@user_errors
def list_(
    name: Optional[str] = typer.Argument(None, help="Pool name (default: every pool)."),
    address: str = Address,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """List the pools' actors and their devices."""
    from workers.ray_pool.actors import list_pool

    rows = list_pool(address, name)
    if as_json:
        typer.echo(json.dumps(rows))
    elif not rows:
        typer.echo("no specdit pools on this cluster")
    else:
        _table(rows)


@pool_app.command("stop", cls=opt.AliasedCommand)
@user_errors
def stop(name: str = typer.Argument("specdit", help="Pool name."), address: str = Address):
    """Kill a pool's actors and free its placement group."""
    from workers.ray_pool.actors import stop_pool

    typer.echo(plain(f"stopped pool {name!r} ({stop_pool(address, name)} actors)"))


def register(app: typer.Typer) -> None:
    app.add_typer(pool_app, name="pool")
