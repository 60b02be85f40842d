"""Confinement of the file paths a job spec names: output directories, and optionally model and reference paths.

A job spec is written by whoever can reach Redis and executed by every worker, so its paths are hostile input.

- **Output directories** are stored *relative to an output root*: ``SPECDIT_OUTPUT_ROOT`` (default
  ``./outputs``, relative to the process's working directory). ``output.dir`` must be a relative path without
  ``..``; an absolute path is accepted only when it lies inside the validating process's root, and is then stored
  relative to it. Every process (each worker, the aggregator, the CLI) resolves ``<root>/<dir>/<job id>``
  against *its own* root and re-checks, with symlinks resolved, that the result is still inside that root
  (:func:`job_dir`). Writing anywhere else is refused (:class:`PathError`, exit code 2).
- **Model and reference paths** are confined the same way when ``SPECDIT_MODEL_ROOT`` is set: a model, a
  ``model:<path>`` / ``feature:<folder>`` drafter or an FID reference ``.npz`` given as a path must lie inside
  that root (symlinks resolved); registered names (``gmm-2d``, ``mnist-dit`` ...) are not paths. Unset (the
  default, for a single user), any path the process can read is allowed.

Equivalent spellings of one directory (``jobs``, ``./jobs/``, ``jobs//.``, ``<root>/jobs``) normalise to one
string, so they give one job id.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cluster.errors import SpecError

OUTPUT_ROOT_ENV = "SPECDIT_OUTPUT_ROOT"
DEFAULT_OUTPUT_ROOT = "outputs"
MODEL_ROOT_ENV = "SPECDIT_MODEL_ROOT"
# C0/C1 control characters (ESC included), zero-width and bidirectional-formatting characters: never part of a
# name or path a job may carry (they would reach terminals through logs and listings).
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
# Suffixes of the files a model, drafter or reference may be loaded from (anything with a '/' is a path too).
PATH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


class PathError(SpecError):
    """A path that escapes its root, or an output directory that cannot be one (exit code 2)."""


def output_root() -> Path:
    """This process's output root (absolute, symlinks not yet resolved)."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or DEFAULT_OUTPUT_ROOT).expanduser().absolute()


def model_root() -> Path | None:
    """This process's model root, or None when model paths are not confined."""
    v = os.environ.get(MODEL_ROOT_ENV)
    return Path(v).expanduser().absolute() if v else None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _clean_parts(value: str) -> list[str]:
    """The components of a '/'-separated path without empty and '.' parts ('..' kept)."""
    return [p for p in value.split("/") if p not in ("", ".")]


def _relative_to_root(value: str, root: Path, what: str, env: str) -> str:
    """``value`` (absolute, or relative to ``root``) as a normalised path relative to ``root``; refuses '..',
    NUL bytes and absolute paths outside the root (symlinks resolved)."""
    if not value or CONTROL_CHARS.search(value):
        raise PathError(f"{what} must be a non-empty path without control characters")
    if value.startswith("~"):
        raise PathError(f"{what} {value!r}: '~' is not expanded; give a path relative to the root {env}")
    if os.path.isabs(value):
        real_root, real = os.path.realpath(root), os.path.realpath(value)
        if not _inside(real, real_root):
            raise PathError(f"{what} {value!r} is outside the root {root} ({env}); give a path relative to it")
        value = os.path.relpath(real, real_root)
    parts = _clean_parts(value)
    if ".." in parts:
        raise PathError(f"{what} {value!r} must not contain '..' (paths are relative to the root {env})")
    return "/".join(parts) or "."


def normalize_output_dir(value: str) -> str:
    """The canonical, root-relative form of a spec's ``output.dir`` (see the module docstring)."""
    return _relative_to_root(value, output_root(), "output.dir", OUTPUT_ROOT_ENV)


def confined(root: Path, relative: str, what: str, env: str) -> Path:
    """``root / relative`` with symlinks resolved; PathError unless it is still inside ``root``."""
    if os.path.isabs(relative) or ".." in _clean_parts(relative):
        raise PathError(f"{what} {relative!r} must be relative to the root {root} ({env}) without '..'")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, relative))
    if not _inside(real, real_root):
        raise PathError(f"{what} {relative!r} resolves to {real}, outside the root {real_root} ({env}): "
                        "a symlink points out of it")
    return Path(real)


def job_dir(output_dir: str, job_id: str) -> Path:
    """``<output root>/<output_dir>/<job_id>`` for this process, confined to the output root (symlinks
    resolved). Raises PathError when it escapes, or when a component of it exists and is not a directory."""
    path = confined(output_root(), f"{output_dir}/{job_id}", "output directory", OUTPUT_ROOT_ENV)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise PathError(f"output directory {path}: {p} exists and is not a directory")
            break
    return path


def looks_like_path(value: str) -> bool:
    """Whether a model/drafter/reference string names a file rather than a registered name."""
    return "/" in value or value.startswith((".", "~")) or value.lower().endswith(PATH_SUFFIXES)


def is_registered_name(value: str) -> bool:
    """A built-in model, an analytic preset or the synthetic engine's ``synthetic-<D>d``: not a path."""
    from specdit.models.registry import known_names

    return value in known_names() or re.fullmatch(r"synthetic-\d+d", value) is not None


def _is_path(value: str, is_path: bool) -> bool:
    """With ``SPECDIT_MODEL_ROOT`` set, everything but a registered name is a path under that root (a bare
    ``my-model`` must not load from the worker's working directory); unset, only what looks like a path."""
    if is_path or looks_like_path(value):
        return True
    return model_root() is not None and not is_registered_name(value)


def normalize_model_path(value: str, what: str = "model", *, is_path: bool = False) -> str:
    """Canonical form of a model/drafter/reference path: unchanged for registered names; with
    ``SPECDIT_MODEL_ROOT`` set, relative to that root (refusing '..' and paths outside it); otherwise the path
    with empty and '.' components removed (so ``./m.pt`` and ``m.pt`` give one job id). ``is_path``: ``value``
    is a path even without a '/' or a file suffix (the folder of a ``feature:<folder>`` drafter)."""
    if CONTROL_CHARS.search(value):
        raise PathError(f"{what} {CONTROL_CHARS.sub('?', value)!r} contains control characters")
    if not _is_path(value, is_path):
        return value
    root = model_root()
    if root is not None:
        return _relative_to_root(value, root, what, MODEL_ROOT_ENV)
    lead = "/" if value.startswith("/") else ""
    return lead + "/".join(_clean_parts(value)) if _clean_parts(value) else value


def resolve_sampler_paths(sampler: dict) -> dict:
    """Sampler settings with a ``model:<path>`` or ``feature:<folder>`` drafter resolved like
    :func:`resolve_model_path`."""
    kind, sep, arg = str(sampler.get("drafter", "")).partition(":")
    if kind not in ("model", "feature") or not sep:
        return sampler
    return {**sampler, "drafter": f"{kind}:{resolve_model_path(arg, 'drafter', is_path=kind == 'feature')}"}


def resolve_model_path(value: str, what: str = "model", *, is_path: bool = False) -> str:
    """The path this process loads for a stored model/drafter/reference string: with ``SPECDIT_MODEL_ROOT``
    set, resolved against this process's root and re-checked (symlinks resolved); otherwise unchanged."""
    root = model_root()
    if root is None or not _is_path(value, is_path):
        return value
    return str(confined(root, value, what, MODEL_ROOT_ENV))
