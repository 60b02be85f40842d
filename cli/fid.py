"""``specdit fid`` and ``specdit fid-ref``: FID between two sources, and cached reference statistics."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.common import check_output_file, fail, user_errors


class Features(str, Enum):
    inception = "inception"
    mnist = "mnist"
    raw = "raw"


def _accuracy_line(src, name: str) -> Optional[str]:
    """Class accuracy of a labelled MNIST-sized image source, else None."""
    if src.labels is None or src.data is None:
        return None
    from specdit.metrics.mnist_classifier import class_accuracy

    try:
        acc = class_accuracy(src.images_uint8(), src.labels)
    except ValueError:
        return None  # not MNIST-shaped images
    return f"class accuracy ({name}): {acc:.4f}  (n={src.labels.shape[0]})"


def fid(
    source_a: str = typer.Argument(..., help="Folder of images, .npz of samples or FeatureStats, or a named reference (mnist)."),
    source_b: str = typer.Argument("mnist", help="Second source (default: the built-in MNIST reference)."),
    features: Features = typer.Option(Features.inception, "--features", "-f", help="Feature extractor."),
    batch_size: Optional[int] = typer.Option(None, help="Extractor batch size (default per extractor)."),
    save_stats: Optional[Path] = typer.Option(None, help="Also save SOURCE_A's FeatureStats to this .npz."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Compute the FID between two sources (plus class accuracy when an .npz carries labels)."""
    from specdit.metrics.fid import frechet_distance
    from specdit.metrics.sources import load_source, source_stats

    if save_stats is not None:
        check_output_file(save_stats, "--save-stats file")
    try:
        a, b = load_source(source_a), load_source(source_b)
        sa = source_stats(a, features.value, batch_size=batch_size, progress=progress)
        sb = source_stats(b, features.value, batch_size=batch_size, progress=progress)
        if save_stats is not None:
            typer.echo(f"saved {sa.save(save_stats)}")
        value = frechet_distance(sa, sb)
        lines = [_accuracy_line(a, "A"), _accuracy_line(b, "B")] if features != Features.raw else []
    except (ValueError, OSError) as e:  # SourceError is a ValueError; FileNotFoundError an OSError
        fail(str(e))
    for side, st in (("A", sa), ("B", sb)):
        if st.n is not None and 0 < st.n <= st.dim:  # moments only (ADM's mu/sigma): no count to check  # rank-deficient covariance: the estimate is biased and can go negative
            typer.secho(f"warning: n_{side}={st.n} samples for {st.dim} feature dimensions: the covariance is singular "
                        "and the FID is biased (it can be negative); use more samples than dimensions",
                        err=True, fg=typer.colors.YELLOW)
    counts = ", ".join(f"n_{side}={'mu/sigma' if st.n is None else st.n}" for side, st in (("A", sa), ("B", sb)))
    typer.echo(f"FID[{features.value}] = {value:.6g}  ({counts})")
    for line in lines:
        if line:
            typer.echo(line)


def fid_ref(
    name: str = typer.Argument("mnist", help="Named reference data set."),
    features: Features = typer.Option(Features.inception, "--features", "-f", help="Feature extractor."),
    recompute: bool = typer.Option(False, help="Ignore cached/shipped statistics."),
    out: Optional[Path] = typer.Option(None, help="Write here instead of the user cache."),
    batch_size: Optional[int] = typer.Option(None, help="Extractor batch size (default per extractor)."),
) -> None:
    """Compute (once) and cache the FID reference statistics of a built-in data set."""
    from specdit.metrics.reference import reference_stats, reference_stats_path

    if out is not None:
        check_output_file(out, "--out file")
    try:
        stats = reference_stats(name, features.value, recompute=recompute, out=out, batch_size=batch_size)
    except (ValueError, OSError) as e:
        fail(str(e))
    where = out or reference_stats_path(name, features.value)
    typer.echo(f"{name}/{features.value}: n={stats.n} dim={stats.dim} checksum={stats.checksum} -> {where}")


def register(app: typer.Typer) -> None:
    app.command("fid")(user_errors(fid))
    app.command("fid-ref")(user_errors(fid_ref))
