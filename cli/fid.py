"""``specdit fid`` and ``specdit fid-ref``: FID between two sources, and cached reference statistics."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.common import check_output_file, user_errors
from cli.options import AliasedCommand, path_value
from cli.render import plain


class Features(str, Enum):
    inception = "inception"
    mnist = "mnist"
    raw = "raw"


def fid(
    source_a: str = typer.Argument(..., help="Folder of images, .npz of samples or FeatureStats, or a named reference (mnist)."),
    source_b: str = typer.Argument("mnist", help="Second source (default: the built-in MNIST reference)."),
    features: Features = typer.Option(Features.inception, "--features", "-f", help="Feature extractor."),
    batch_size: Optional[int] = typer.Option(None, help="Extractor batch size (default per extractor)."),
    save_stats: Optional[Path] = typer.Option(None, parser=path_value,
                                              help="Also save SOURCE_A's FeatureStats to this .npz."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Compute the FID between two sources (plus class accuracy when an .npz carries labels)."""
    from specdit.metrics.sources import compare_sources

    if save_stats is not None:
        check_output_file(save_stats, "--save-stats file")
    res = compare_sources(source_a, source_b, features.value, batch_size=batch_size, progress=progress,
                          save_stats=save_stats)
    if res.saved is not None:
        typer.echo(plain(f"saved {res.saved}"))
    for side, st in (("A", res.stats_a), ("B", res.stats_b)):
        if st.n is not None and 0 < st.n <= st.dim:  # rank-deficient covariance (ADM's mu/sigma carry no count)
            typer.secho(f"warning: n_{side}={st.n} samples for {st.dim} feature dimensions: the covariance is singular "
                        "and the FID is biased (it can be negative); use more samples than dimensions",
                        err=True, fg=typer.colors.YELLOW)
    counts = ", ".join(f"n_{side}={'mu/sigma' if st.n is None else st.n}" for side, st in (("A", res.stats_a), ("B", res.stats_b)))
    typer.echo(f"FID[{features.value}] = {res.fid:.6g}  ({counts})")
    for side, (acc, n) in res.accuracy.items():
        typer.echo(f"class accuracy ({side}): {acc:.4f}  (n={n})")


def fid_ref(
    name: str = typer.Argument("mnist", help="Named reference data set."),
    features: Features = typer.Option(Features.inception, "--features", "-f", help="Feature extractor."),
    recompute: bool = typer.Option(False, help="Ignore cached/shipped statistics."),
    out: Optional[Path] = typer.Option(None, parser=path_value, help="Write here instead of the user cache."),
    batch_size: Optional[int] = typer.Option(None, help="Extractor batch size (default per extractor)."),
) -> None:
    """Compute (once) and cache the FID reference statistics of a built-in data set."""
    from specdit.metrics.reference import reference_stats, reference_stats_path

    if out is not None:
        check_output_file(out, "--out file")
    stats = reference_stats(name, features.value, recompute=recompute, out=out, batch_size=batch_size)
    where = out or reference_stats_path(name, features.value)
    typer.echo(plain(f"{name}/{features.value}: n={stats.n} dim={stats.dim} checksum={stats.checksum} -> {where}"))


def register(app: typer.Typer) -> None:
    app.command("fid", cls=AliasedCommand)(user_errors(fid))
    app.command("fid-ref", cls=AliasedCommand)(user_errors(fid_ref))
