"""The ``onnx-sp2ps`` command: the only module that prints or exits.

Exit codes (README "Supported and refused"): 0 passed, 1 gate failed, 2 usage error,
3 input not usable, 4 internal error (traceback only with ``--debug``), 128 + signal
when SIGINT (130), SIGTERM (143) or SIGHUP (129) ends the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, TypeVar

import click

from onnx_sp2ps._version import __version__
from onnx_sp2ps.cams import METHODS
from onnx_sp2ps.data import LAYOUTS, PRESETS
from onnx_sp2ps.errors import InputError, Interrupted, Sp2psError, UsageError
from onnx_sp2ps.gate import GATE_ON
from onnx_sp2ps.providers import PROVIDERS
from onnx_sp2ps.targets import AUDIT_TARGETS

if TYPE_CHECKING:
    from onnx_sp2ps.data import Preprocess
    from onnx_sp2ps.gate import GateCheck, GateCriteria
    from onnx_sp2ps.intervals import IntervalSettings
    from onnx_sp2ps.pipeline import AuditResult, AuditSettings, ModelOptions
    from onnx_sp2ps.report import ReportSet

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3, 4
#: Upper bounds of numeric options (each says what is allowed in its error).
MAX_THREADS, MAX_BATCH, MAX_WORST, MAX_SCORECAM_CHANNELS = 256, 4096, 1000, 4096
#: Choices of --format, and of audit's --overlays (the worst N images, all, none).
FORMATS = ("text", "json")
OVERLAY_MODES = ("worst", "all", "none")
#: Choices of audit's --engine, and the upper bound of --workers and per-worker resources.
ENGINES, MAX_WORKERS = ("local", "ray"), 4096


#: Paths are checked by the library, which says what is wrong in one line (click's own
#: readability check would make an unreadable file a usage error, exit 2).
_PATH = click.Path(path_type=Path, readable=False)
_FILE_PATH = click.Path(dir_okay=False, path_type=Path, readable=False)


def _err(message: str) -> None:
    """One line on stderr: control characters and undecodable bytes shown escaped."""
    from onnx_sp2ps.files import one_line

    click.echo(one_line(message), err=True)


# --------------------------------------------------------------------------- option values


def _parse_floats(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(_parse_number(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None


def _parse_number(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _parse_scale(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        scale = _parse_number(value)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(
            f"expected a number such as 0.0039 or 1/255, got {value!r}"
        ) from None
    if not scale > 0:
        raise click.BadParameter("must be greater than 0")
    return scale


def _parse_size_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    from onnx_sp2ps.data import parse_size

    try:
        return parse_size(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``8G``, ``512M``, ``1.5G`` or a number of bytes."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        amount = float(text[: len(text) - len(unit)])
    except ValueError:
        raise click.BadParameter(
            f"expected a size such as 8G, 512M or 1073741824, got {value!r}"
        ) from None
    if not (amount > 0 and amount * _UNITS[unit] < 1 << 60):
        raise click.BadParameter("must be a size above 0 and below 1 EiB")
    return int(amount * _UNITS[unit])


def _unit_interval(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter("must be between 0 and 1")
    return value


def _out_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    if value is None:
        return None
    if not value.strip():
        raise click.BadParameter("must name a folder, not an empty string")
    return Path(value)


# --------------------------------------------------------------------------- option groups

#: A click decorator adding options to a command.
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
_G = TypeVar("_G", bound="_OptionGroup")

#: Options that more than one group or command shows, declared once.
_FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Output on stdout.",
)
_FORCE_OPTION = click.option(
    "--force",
    is_flag=True,
    help="Replace files under --out (and --junit) that this tool did not write.",
)
_MAX_MEMORY_OPTION = click.option(
    "--max-memory",
    callback=_parse_bytes,
    metavar="SIZE",
    help="Memory budget (e.g. 8G): models and batches declaring more are refused before "
    "anything is allocated (default: half the memory available).",
)


def _apply(options: list[Decorator]) -> Decorator:
    """One decorator adding ``options``, shown in this order by --help."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


class _OptionGroup:
    """A group of options, in the manner of Polygraphy's argument groups: a frozen
    dataclass of the values. :meth:`declared` is the one place that declares its click
    options, :meth:`from_params` the one place that takes their values out of a command's
    keyword arguments (``**params``) and checks them. Where the fields are the click
    parameter names, the default :meth:`from_params` takes the values as they are."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        """The group's click options by field name, in --help order."""
        raise NotImplementedError

    @classmethod
    def options(cls, *names: str) -> Decorator:
        """A decorator adding the group's options (only ``names``, in the declared order,
        where a command shows other options between them)."""
        declared = cls.declared()
        unknown = set(names) - set(declared)
        if unknown:
            raise TypeError(f"{cls.__name__} has no options {sorted(unknown)}")
        return _apply([option for name, option in declared.items() if not names or name in names])

    @classmethod
    def from_params(cls: type[_G], params: dict[str, Any]) -> _G:
        """The group from (and without) its values in ``params``, a command's keyword
        arguments."""
        return cls(**{f.name: params.pop(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class CommonOptions(_OptionGroup):
    """--debug, --quiet and --config (every command)."""

    quiet: bool
    debug: bool  # read by main() from the command line, before click

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "debug": click.option(
                "--debug", is_flag=True, help="Show tracebacks of internal errors."
            ),
            "quiet": click.option(
                "-q", "--quiet", is_flag=True, help="No progress bar or diagnostics."
            ),
            "config": click.option(
                "--config",
                type=_PATH,
                is_eager=True,
                callback=_apply_config,
                expose_value=False,
                metavar="FILE",
                help="TOML file of settings (long option names as keys); the command line wins.",
            ),
        }

    @property
    def console(self) -> _Console:
        return _Console(self.quiet)


@dataclass(frozen=True)
class ImageOptions(_OptionGroup):
    """The images and how they are read: --images, --class-names, --strict."""

    images: Path
    class_names: Path | None
    strict: bool

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "images": click.option(
                "--images",
                required=True,
                type=_PATH,
                help="Folder of images (sub-folders = classes) or a preprocessed .npy/.npz.",
            ),
            "class_names": click.option(
                "--class-names",
                type=_FILE_PATH,
                help="File with one class name per line, in class order; image "
                "sub-folders named after classes give the labels.",
            ),
            "strict": click.option(
                "--strict",
                is_flag=True,
                help="Stop (exit 3) on an unreadable image instead of skipping it.",
            ),
        }


@dataclass(frozen=True)
class PreprocessOptions(_OptionGroup):
    """Options that build a :class:`onnx_sp2ps.data.Preprocess`."""

    preset: str
    size: tuple[int, int] | None
    center_crop: bool
    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    bgr: bool
    layout: str | None
    fast_decode: bool

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "preset": click.option(
                "--preprocess",
                "preset",
                type=click.Choice(list(PRESETS)),
                default="unit",
                show_default=True,
                help="Preset: unit x/255; imagenet x/255 then ImageNet mean/std; raw x.",
            ),
            "size": click.option(
                "--size",
                callback=_parse_size_option,
                metavar="HxW",
                help="Input size (default: the model's static input size).",
            ),
            "center_crop": click.option(
                "--center-crop",
                is_flag=True,
                help="Resize the shorter side to size/0.875, then crop the centre.",
            ),
            "scale": click.option(
                "--scale",
                callback=_parse_scale,
                metavar="X",
                help="Multiply pixels by X (default from the preset, e.g. 1/255).",
            ),
            "mean": click.option(
                "--mean",
                callback=_parse_floats,
                metavar="M[,M,M]",
                help="Subtract per channel, after scaling.",
            ),
            "std": click.option(
                "--std",
                callback=_parse_floats,
                metavar="S[,S,S]",
                help="Divide per channel, after the mean.",
            ),
            "bgr": click.option("--bgr", is_flag=True, help="Feed channels in BGR order."),
            "layout": click.option(
                "--layout",
                type=click.Choice(LAYOUTS),
                help="Input layout (default: detected from the model).",
            ),
            "fast_decode": click.option(
                "--fast-decode/--exact-decode",
                default=False,
                help="Decode large JPEGs at reduced scale (about 1.7x faster; pixels within "
                "the bounds README gives) instead of exactly (the default).",
            ),
        }

    def preprocess(self) -> Preprocess:
        """The library's preprocessing (UsageError where the values do not fit)."""
        from onnx_sp2ps.data import Preprocess

        return Preprocess(
            preset=self.preset,
            size=self.size,
            center_crop=self.center_crop,
            scale=self.scale,
            mean=self.mean,
            std=self.std,
            bgr=self.bgr,
            layout=self.layout,
            fast_decode=self.fast_decode,
        )


@dataclass(frozen=True)
class ModelOverrides(_OptionGroup):
    """--input-name/--feature-layer/--logits, for the model (or the original) and, in
    audits, their --candidate-* twins for the candidates (each defaulting to the
    original's); --prefix-tokens/--token-grid for token models, the same for all."""

    model: ModelOptions
    candidates: ModelOptions

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "input_name": click.option(
                "--input-name",
                metavar="NAME",
                help="Image input tensor (when the model has several inputs).",
            ),
            "feature_layer": click.option(
                "--feature-layer", metavar="NAME", help="Feature-map tensor, overriding detection."
            ),
            "logits": click.option(
                "--logits", metavar="NAME", help="Logits tensor, overriding detection."
            ),
            "candidate_input_name": click.option(
                "--candidate-input-name",
                metavar="NAME",
                help="Like --input-name, for the candidates.",
            ),
            "candidate_feature_layer": click.option(
                "--candidate-feature-layer",
                metavar="NAME",
                help="Like --feature-layer, for the candidates (pruned graphs may rename tensors).",
            ),
            "candidate_logits": click.option(
                "--candidate-logits", metavar="NAME", help="Like --logits, for the candidates."
            ),
            "prefix_tokens": click.option(
                "--prefix-tokens",
                type=click.IntRange(0, 4096),
                metavar="N",
                help="Token models: class/distillation/register tokens before the patch "
                "tokens, overriding detection.",
            ),
            "token_grid": click.option(
                "--token-grid",
                callback=_parse_size_option,
                metavar="HxW",
                help="Token models: the patch-token grid, e.g. 14x14, overriding detection.",
            ),
        }

    @classmethod
    def options(cls, *names: str, candidates: bool = False) -> Decorator:
        """The model's options, and with ``candidates`` the candidates' twins."""
        if not names and not candidates:
            names = ("input_name", "feature_layer", "logits", "prefix_tokens", "token_grid")
        return super().options(*names)

    @classmethod
    def from_params(cls, params: dict[str, Any], *, candidates: bool = False) -> ModelOverrides:
        from onnx_sp2ps.pipeline import ModelOptions

        prefix_tokens = params.pop("prefix_tokens")
        token_grid = params.pop("token_grid")
        model = ModelOptions(
            input_name=params.pop("input_name"),
            feature_layer=params.pop("feature_layer"),
            logits=params.pop("logits"),
            prefix_tokens=prefix_tokens,
            token_grid=token_grid,
        )
        if not candidates:
            return cls(model=model, candidates=model)
        twins = ModelOptions(
            input_name=params.pop("candidate_input_name") or model.input_name,
            feature_layer=params.pop("candidate_feature_layer") or model.feature_layer,
            logits=params.pop("candidate_logits") or model.logits,
            prefix_tokens=prefix_tokens,
            token_grid=token_grid,
        )
        return cls(model=model, candidates=twins)


@dataclass(frozen=True)
class RuntimeOptions(_OptionGroup):
    """How the models run: --max-memory, --provider, --threads, --batch-size."""

    max_memory: int | None
    provider: str
    threads: int | None
    batch_size: int

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "max_memory": _MAX_MEMORY_OPTION,
            "provider": click.option(
                "--provider",
                type=click.Choice(PROVIDERS),
                default="auto",
                show_default=True,
                help="Execution provider; CUDA falls back to CPU.",
            ),
            "threads": click.option(
                "--threads",
                type=click.IntRange(1, MAX_THREADS),
                metavar="N",
                help=f"onnxruntime intra-op threads, 1 to {MAX_THREADS} (default: all cores).",
            ),
            "batch_size": click.option(
                "--batch-size",
                type=click.IntRange(1, MAX_BATCH),
                default=16,
                show_default=True,
                help=f"Images per batch, 1 to {MAX_BATCH}.",
            ),
        }


@dataclass(frozen=True)
class EngineOptions(_OptionGroup):
    """Where ``audit`` runs its batches: --engine local (this process) or ray (Ray
    actors: README "Ray"), with --ray-address, --workers, --cpus-per-worker and
    --gpus-per-worker (Ray only)."""

    engine: str
    ray_address: str | None
    workers: int | None
    cpus_per_worker: float | None
    gpus_per_worker: float | None

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "engine": click.option(
                "--engine",
                type=click.Choice(ENGINES),
                default="local",
                show_default=True,
                help="Run the batches in this process, or on Ray workers "
                "(pip install 'onnx-sp2ps[ray]').",
            ),
            "ray_address": click.option(
                "--ray-address",
                metavar="ADDRESS",
                help="With --engine ray: join this running cluster (default: start a local "
                "Ray instance for the audit).",
            ),
            "workers": click.option(
                "--workers",
                type=click.IntRange(1, MAX_WORKERS),
                metavar="N",
                help=f"With --engine ray: worker actors, 1 to {MAX_WORKERS} (default: as "
                "many as the CPUs, or GPUs, allow).",
            ),
            "cpus_per_worker": click.option(
                "--cpus-per-worker",
                type=click.FloatRange(0, MAX_WORKERS, min_open=True),
                metavar="X",
                help="With --engine ray: Ray CPUs per worker, over 0 (default 1); also its "
                "onnxruntime threads (rounded up) unless --threads is given.",
            ),
            "gpus_per_worker": click.option(
                "--gpus-per-worker",
                type=click.FloatRange(0, MAX_WORKERS),
                metavar="X",
                help="With --engine ray: Ray GPUs per worker (1: one worker per GPU, run "
                "with CUDA; default 0).",
            ),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> EngineOptions:
        group = super().from_params(params)
        given = [
            f"--{f.name.replace('_', '-')}"
            for f in fields(cls)
            if f.name != "engine" and getattr(group, f.name) is not None
        ]
        if group.engine == "local" and given:
            verb = "needs" if len(given) == 1 else "need"
            raise click.UsageError(f"{', '.join(given)} {verb} --engine ray")
        return group

    def audit_function(self, provider: str) -> Callable[..., AuditResult]:
        """``pipeline.audit``, or its Ray twin with these options (same arguments)."""
        if self.engine == "local":
            from onnx_sp2ps.pipeline import audit as local_audit

            return local_audit
        import functools

        from onnx_sp2ps.ray_engine import RayOptions
        from onnx_sp2ps.ray_engine import audit as ray_audit

        if self.gpus_per_worker and provider == "cpu":
            raise click.UsageError("--gpus-per-worker needs --provider auto or cuda, not cpu")
        options = RayOptions(
            address=self.ray_address,
            workers=self.workers,
            cpus_per_worker=1.0 if self.cpus_per_worker is None else self.cpus_per_worker,
            gpus_per_worker=self.gpus_per_worker or 0.0,
        )
        return functools.partial(ray_audit, options=options)


@dataclass(frozen=True)
class CamOptions(_OptionGroup):
    """Which maps: --method, --scorecam-channels, --target (in audits one of
    :data:`~onnx_sp2ps.targets.AUDIT_TARGETS`; for ``cam`` also a class index)."""

    method: str
    scorecam_channels: int | None
    target: str | int

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "method": click.option(
                "--method",
                type=click.Choice(list(METHODS)),
                default="gradcam",
                show_default=True,
                help="CAM method.",
            ),
            "scorecam_channels": click.option(
                "--scorecam-channels",
                type=click.IntRange(1, MAX_SCORECAM_CHANNELS),
                metavar="N",
                help="Score-CAM: use the N channels with the largest mean "
                f"activation, 1 to {MAX_SCORECAM_CHANNELS}.",
            ),
            "audit_target": click.option(
                "--target",
                type=click.Choice(AUDIT_TARGETS),
                default="original",
                show_default=True,
                help="Class explained: the original's top-1 (both models), the label, or "
                "each model's own top-1.",
            ),
            "target": click.option(
                "--target",
                default="own",
                show_default=True,
                metavar="own|label|K",
                help="Class explained: each image's top-1, its label, or class K.",
            ),
        }

    @classmethod
    def options(cls, *names: str, audit: bool = False) -> Decorator:
        """The options of ``audit`` (``audit``) or of ``cam``."""
        if not names:
            names = ("method", "scorecam_channels", "audit_target" if audit else "target")
        return super().options(*names)

    @classmethod
    def from_params(cls, params: dict[str, Any], *, audit: bool = False) -> CamOptions:
        """The options; ``cam``'s --target (text) checked and parsed."""
        group = super().from_params(params)
        if audit:  # a choice that click checked
            return group
        from onnx_sp2ps.targets import parse_target

        try:
            target = parse_target(str(group.target), allow_original=False)
        except UsageError as exc:
            raise click.BadParameter(str(exc), param_hint="--target") from None
        return replace(group, target=target)


@dataclass(frozen=True)
class GateOptions(_OptionGroup):
    """The gate criteria, shared by ``audit`` and ``gate``."""

    fail_under: float | None
    fail_under_p5: float | None
    min_agreement: float | None
    max_accuracy_drop: float | None
    gate_on: str
    max_ci_width: float | None

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "fail_under": click.option(
                "--fail-under",
                type=float,
                metavar="X",
                callback=_unit_interval,
                help="Gate: each candidate's Sp2PS mean must be >= X.",
            ),
            "fail_under_p5": click.option(
                "--fail-under-p5",
                type=float,
                metavar="X",
                callback=_unit_interval,
                help="Gate: the 5th percentile of per-image Sp2PS must be >= X.",
            ),
            "min_agreement": click.option(
                "--min-agreement",
                type=float,
                metavar="X",
                callback=_unit_interval,
                help="Gate: top-1 agreement with the original must be >= X.",
            ),
            "max_accuracy_drop": click.option(
                "--max-accuracy-drop",
                type=float,
                metavar="X",
                callback=_unit_interval,
                help="Gate: original accuracy minus candidate accuracy must be <= X "
                "(absolute; needs labels).",
            ),
            "gate_on": click.option(
                "--gate-on",
                type=click.Choice(GATE_ON),
                default="mean",
                show_default=True,
                help="What --fail-under and --fail-under-p5 compare: the figure, or the "
                "lower end of its confidence interval (passes only when the data show it "
                "is above the threshold).",
            ),
            "max_ci_width": click.option(
                "--max-ci-width",
                type=float,
                metavar="W",
                callback=_unit_interval,
                help="Gate: the confidence interval of the Sp2PS mean must be at most W "
                "wide (else the sample is too small to decide).",
            ),
        }

    def criteria(self) -> GateCriteria:
        from onnx_sp2ps.gate import GateCriteria

        return GateCriteria(
            fail_under=self.fail_under,
            fail_under_p5=self.fail_under_p5,
            min_agreement=self.min_agreement,
            max_accuracy_drop=self.max_accuracy_drop,
            gate_on=self.gate_on,
            max_ci_width=self.max_ci_width,
        )


@dataclass(frozen=True)
class IntervalOptions(_OptionGroup):
    """The confidence intervals (README, "Intervals"): --confidence, --resamples
    (``audit`` and ``merge``)."""

    confidence: float
    resamples: int

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        from onnx_sp2ps.intervals import MAX_RESAMPLES, MIN_RESAMPLES

        return {
            "confidence": click.option(
                "--confidence",
                type=click.FloatRange(0.5, 1.0, max_open=True),
                default=0.95,
                show_default=True,
                metavar="C",
                help="Level of the confidence intervals (bootstrap over images), 0.5 to below 1.",
            ),
            "resamples": click.option(
                "--resamples",
                type=click.IntRange(MIN_RESAMPLES, MAX_RESAMPLES),
                default=2000,
                show_default=True,
                metavar="B",
                help=f"Bootstrap resamples of the intervals, {MIN_RESAMPLES} to {MAX_RESAMPLES}.",
            ),
        }

    def settings(self) -> IntervalSettings:
        from onnx_sp2ps.intervals import IntervalSettings

        return IntervalSettings(confidence=self.confidence, resamples=self.resamples)


@dataclass(frozen=True)
class AuditOutput(_OptionGroup):
    """What ``audit`` writes: --out, --format, --junit, --summary-md, --save-maps,
    --worst, --overlays, --force."""

    out: Path | None
    fmt: str
    junit: Path | None
    summary_md: Path | None
    save_maps: bool
    worst: int
    overlays: str
    force: bool
    original_cache: Path | None

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "out": click.option(
                "--out",
                type=click.Path(),
                callback=_out_path,
                help="Folder for report.json (and maps).",
            ),
            "original_cache": click.option(
                "--original-cache",
                type=click.Path(path_type=Path),
                metavar="DIR",
                help="Keep the original's results in DIR (made if missing) and reuse them "
                "when the original, images and settings are the same: later audits run "
                "only the candidates.",
            ),
            "fmt": _FORMAT_OPTION,
            "junit": click.option(
                "--junit",
                type=_FILE_PATH,
                metavar="FILE",
                help="Write JUnit XML (one test case per candidate and criterion).",
            ),
            "summary_md": click.option(
                "--summary-md",
                type=_FILE_PATH,
                metavar="FILE",
                help="Append a short Markdown summary (pull-request comment, CI job summary "
                "such as $GITHUB_STEP_SUMMARY); an existing file is never truncated.",
            ),
            "save_maps": click.option(
                "--save-maps",
                is_flag=True,
                help="With --out: write OUT/maps/<model>.npz for every model.",
            ),
            "worst": click.option(
                "--worst",
                type=click.IntRange(0, MAX_WORST),
                default=12,
                show_default=True,
                metavar="N",
                help=f"With --out: show the N lowest-scoring images per candidate (0 to "
                f"{MAX_WORST}).",
            ),
            "overlays": click.option(
                "--overlays",
                type=click.Choice(OVERLAY_MODES),
                default="worst",
                show_default=True,
                help="With --out: PNG overlays under OUT/overlays/ for the worst N or all images.",
            ),
            "force": _FORCE_OPTION,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> AuditOutput:
        group = super().from_params(params)
        if group.save_maps and group.out is None:
            raise click.UsageError("--save-maps needs --out")
        return group


@dataclass(frozen=True)
class CamOutput(_OptionGroup):
    """What ``cam`` writes: --out, --overlays, --force."""

    out: Path
    overlays: bool
    force: bool

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "out": click.option(
                "--out",
                required=True,
                type=click.Path(),
                callback=_out_path,
                help="Folder for cams.npz (and overlays).",
            ),
            "overlays": click.option(
                "--overlays", is_flag=True, help="Also write one PNG per image: the map over it."
            ),
            "force": _FORCE_OPTION,
        }


def _parse_shard_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    from onnx_sp2ps.shards import parse_shard

    try:
        return parse_shard(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


@dataclass(frozen=True)
class ShardOptions(_OptionGroup):
    """``audit --shard K/N``: score one shard of the images (README, "At scale")."""

    shard: tuple[int, int] | None

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        return {
            "shard": click.option(
                "--shard",
                callback=_parse_shard_option,
                metavar="K/N",
                help="Score only shard K of N (K from 1 to N) and write its records and "
                "identity to --out, for `onnx-sp2ps merge`; gates belong to the merge.",
            ),
        }


@dataclass(frozen=True)
class MergeOutput(_OptionGroup):
    """What ``merge`` writes: audit's report options (--worst and --overlays default to
    the shards'), plus where the images are and the memory budget."""

    out: Path
    fmt: str
    junit: Path | None
    summary_md: Path | None
    worst: int | None
    overlays: str | None
    force: bool
    images: Path | None
    max_memory: int | None

    @classmethod
    def declared(cls) -> dict[str, Decorator]:
        audit = AuditOutput.declared()
        return {
            "out": click.option(
                "--out",
                required=True,
                type=click.Path(),
                callback=_out_path,
                help="Folder for the merged report set (what audit --out writes).",
            ),
            "fmt": audit["fmt"],
            "junit": audit["junit"],
            "summary_md": audit["summary_md"],
            "worst": click.option(
                "--worst",
                type=click.IntRange(0, MAX_WORST),
                metavar="N",
                help="Show the N lowest-scoring images per candidate (default: as many as "
                "the shards kept; at most that).",
            ),
            "overlays": click.option(
                "--overlays",
                type=click.Choice(OVERLAY_MODES),
                help="PNG overlays for the worst N or all images (default: the shards' "
                "--overlays; all needs shards run with --overlays all or --save-maps).",
            ),
            "force": audit["force"],
            "images": click.option(
                "--images",
                type=_PATH,
                help="Where the shards' images are, when not at the path the shards read "
                "(checked against their fingerprint).",
            ),
            "max_memory": _MAX_MEMORY_OPTION,
        }


def _no_params_left(params: dict[str, Any]) -> None:
    """Every option of a command belongs to a group that took its value."""
    if params:
        raise TypeError(f"options of no group: {', '.join(sorted(params))}")


@dataclass
class _Console:
    quiet: bool

    def info(self, message: str) -> None:
        if not self.quiet:
            _err(message)

    def progress(self, label: str, *, delay: float = 2.0):
        """A progress callback drawing a bar on a terminal stderr once the run has taken
        ``delay`` seconds; nothing when stderr is not a terminal or with ``-q``."""
        if self.quiet or not sys.stderr.isatty():
            return None, lambda: None
        state: dict = {"start": time.monotonic(), "done": 0}

        def update(done: int, total: int) -> None:
            bar = state.get("bar")
            if bar is None:
                if time.monotonic() - state["start"] < delay:
                    return
                bar = click.progressbar(
                    length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True
                )
                bar.__enter__()
                state["bar"] = bar
            bar.update(done - state["done"])
            state["done"] = done

        def close() -> None:
            if "bar" in state:
                state["bar"].__exit__(None, None, None)

        return update, close


# --------------------------------------------------------------------------- commands


CONFIG_TABLE = "onnx-sp2ps"


def _load_toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    from onnx_sp2ps.files import read_bounded, show

    data = read_bounded(path, "config file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise InputError(
            f"cannot read config file {show(path)}: {' '.join(str(exc).split())}: fix the TOML"
        ) from None


def _config_settings(path: Path | None) -> tuple[dict, str | None]:
    """Settings from ``[tool.onnx-sp2ps]`` of ./pyproject.toml, overlaid by the file of
    ``--config``; and a description of where they came from."""
    settings: dict = {}
    sources = []
    pyproject = Path("pyproject.toml")
    if os.path.isfile(pyproject):  # False, not an error, where the folder is not ours
        table = _settings_table(_load_toml(pyproject), pyproject, whole=False)
        if table:
            settings.update(table)
            sources.append(str(pyproject))
    if path is not None:
        settings.update(_settings_table(_load_toml(path), path, whole=True))
        sources.append(str(path))
    return settings, " + ".join(sources) or None


def _settings_table(data: dict, path: Path, *, whole: bool) -> dict:
    """``[tool.onnx-sp2ps]`` of a TOML document (or, with ``whole``, the document itself
    when it has no such table)."""
    tool = data.get("tool")
    table = tool.get(CONFIG_TABLE) if isinstance(tool, dict) else None
    if table is None:
        table = data if whole else {}
    if not isinstance(table, dict):
        from onnx_sp2ps.files import show

        raise click.UsageError(
            f"[tool.{CONFIG_TABLE}] in {show(path)} is not a table: write "
            "option = value lines under it"
        )
    return table


def _apply_config(ctx: click.Context, param, value: Path | None) -> None:
    """Eager callback of ``--config``: the settings become the defaults of the command's
    other options (read before them), so the command line wins."""
    settings, source = _config_settings(value)
    if settings:
        ctx.default_map = _default_map(ctx.command, settings, source or "config")
    ctx.meta["config_source"] = source


def _default_map(command: click.Command, settings: dict, source: str) -> dict:
    """Config keys (option names, with - or _) -> click parameter names of ``command``."""
    params = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for opt in p.opts:
                params[opt.lstrip("-")] = p
    known_anywhere: set[str] = set()
    for cmd in cli.commands.values():
        for p in cmd.params:
            if isinstance(p, click.Option):
                known_anywhere.update(o.lstrip("-") for o in p.opts)
    out = {}
    for key, value in settings.items():
        name = str(key).replace("_", "-")
        if name not in known_anywhere or name == "config":
            raise click.UsageError(
                f"unknown setting {key!r} in {source}: use the long option "
                "names of the command line, e.g. fail-under = 0.8"
            )
        param = params.get(name)
        if param is None:
            continue  # a setting of another command
        out[param.name] = _setting_value(key, value, param, source)
    return out


def _setting_value(key, value, param: click.Option, source: str):
    """A config value as the command line would give it: a string (so click converts and
    checks it exactly as typed), a boolean for a flag, a list of scalars joined by commas.
    Tables, nested lists and dates are refused."""
    scalar = (str, int, float, bool)
    if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool) and param.is_flag:
        return value
    if isinstance(value, scalar):
        return str(value)
    raise click.UsageError(
        f"setting {key!r} in {source} is a {type(value).__name__}: give a "
        "number, a string, a boolean or a list of numbers"
    )


#: Options that change no result, left out of report.json's ``setting_sources`` (a run
#: with --original-cache writes the same report as one without; a merged report names its
#: shards itself).
_NOT_SETTINGS = ("quiet", "debug", "config", "original_cache", "shard")


@contextlib.contextmanager
def _cache_notes() -> Iterator[None]:
    """Print the original cache's notes (:class:`onnx_sp2ps.cache.CacheNote`) as one
    ``note:`` line each; other warnings are shown as before."""
    from onnx_sp2ps.cache import CacheNote

    with warnings.catch_warnings():
        warnings.simplefilter("always", CacheNote)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CacheNote):
                _err(f"note: {message}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def setting_sources(ctx: click.Context) -> dict:
    """Where each setting of the running command came from (for the report)."""
    from click.core import ParameterSource

    names: dict[ParameterSource | None, str] = {
        ParameterSource.COMMANDLINE: "command line",
        ParameterSource.ENVIRONMENT: "environment",
        ParameterSource.DEFAULT_MAP: ctx.find_root().meta.get("config_source") or "config",
        ParameterSource.DEFAULT: "default",
    }
    out = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name not in _NOT_SETTINGS:
            long = max(p.opts, key=len).lstrip("-")
            out[long] = names.get(ctx.get_parameter_source(p.name), "default")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-sp2ps")
def cli():
    """Compare the class activation maps of an ONNX classifier and its compressed copy
    (Sp2PS score), and gate releases on it.

    Any option can also be set in a TOML file (--config FILE, keys = long option
    names) or in a [tool.onnx-sp2ps] table of ./pyproject.toml; the command line wins.
    """


@cli.command()
@click.argument("model", type=_PATH)
@_FORMAT_OPTION
@ModelOverrides.options()
@click.option(
    "--size",
    "size",
    callback=_parse_size_option,
    metavar="HxW",
    help="Input size used to infer shapes when the model's is symbolic.",
)
@_MAX_MEMORY_OPTION
@CommonOptions.options()
def inspect(
    model: Path, fmt: str, size: tuple[int, int] | None, max_memory: int | None, **params: Any
) -> int:
    """Show what was detected in MODEL: input, layout, feature map, logits, head ops, and
    the execution providers that can run here (and why the others cannot)."""
    from onnx_sp2ps.model import prepare_model
    from onnx_sp2ps.runtime import ModelRunner, provider_status

    opts = ModelOverrides.from_params(params).model
    CommonOptions.from_params(params)
    _no_params_left(params)
    prepared = prepare_model(
        model,
        input_name=opts.input_name,
        feature_layer=opts.feature_layer,
        logits=opts.logits,
        size=size,
        max_memory=max_memory,
        prefix_tokens=opts.prefix_tokens,
        token_grid=opts.token_grid,
    )
    runner = ModelRunner(prepared, provider="cpu")
    from onnx_sp2ps.files import show

    data = {
        "model": show(model),
        "size_bytes": prepared.size_bytes,
        "parameters": prepared.parameters,
        **prepared.spec.to_dict(),
    }
    status = provider_status()
    data["providers"] = [p for p, reason in status.items() if reason is None]
    data["providers_unavailable"] = {p: r for p, r in status.items() if r is not None}
    data["head"]["gradient"] = runner.gradient_path
    data["head"]["gradient_reason"] = runner.gradient_note
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return EXIT_OK
    spec = prepared.spec
    lines = [
        f"model        {data['model']}  ({prepared.parameters:,} parameters, "
        f"{(prepared.size_bytes or 0) / 1024:.1f} KiB, opset {spec.opset}, "
        f"producer {spec.producer or '?'})",
        f"input        {spec.input.name}  {_shape(spec.input.shape)}  {spec.layout}  "
        f"{spec.input.dtype}",
        f"feature map  {spec.feature_map.name}  {_shape(spec.feature_map.shape)}  "
        f"{spec.feature_layout}",
        *(
            [
                f"token grid   {spec.tokens.prefix} prefix tokens + "
                f"{spec.tokens.grid[0]}x{spec.tokens.grid[1]} patch tokens  ({spec.tokens.rule})"
            ]
            if spec.tokens is not None
            else []
        ),
        *(
            [f"side inputs  {', '.join(spec.side_inputs)}  (held constant in the head)"]
            if spec.side_inputs
            else []
        ),
        f"logits       {spec.logits.name}  {_shape(spec.logits.shape)}"
        + (f"  (read before {spec.activation})" if spec.activation else ""),
        f"head         {' -> '.join(spec.head_ops) or '(none)'}",
        f"gradient     {runner.gradient_path}"
        + (f" ({runner.gradient_note})" if runner.gradient_note else ""),
        f"providers    {', '.join(data['providers'])}",
    ]
    lines += [
        f"             {p}: unavailable ({reason})"
        for p, reason in data["providers_unavailable"].items()
    ]
    click.echo("\n".join(lines))
    return EXIT_OK


def _shape(shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@cli.command()
@click.argument("model", type=_PATH)
@ImageOptions.options("images")
@CamOutput.options("out")
@CamOptions.options()
@CamOutput.options("overlays", "force")
@PreprocessOptions.options()
@ImageOptions.options("class_names", "strict")
@ModelOverrides.options()
@RuntimeOptions.options()
@CommonOptions.options()
def cam(model: Path, **params: Any) -> int:
    """Compute CAMs of MODEL on images; write OUT/cams.npz (paths, targets, logits, raw,
    maps)."""
    from onnx_sp2ps.pipeline import compute_cams
    from onnx_sp2ps.report import ReportSet, overlay_image, write_npz, write_png

    console = CommonOptions.from_params(params).console
    output = CamOutput.from_params(params)
    data = ImageOptions.from_params(params)
    runtime = RuntimeOptions.from_params(params)
    preprocess = PreprocessOptions.from_params(params).preprocess()
    opts = ModelOverrides.from_params(params).model
    cams = CamOptions.from_params(params)
    _no_params_left(params)
    _check_out_not_in_images(output.out, data.images)
    with ReportSet(output.out, CAM_SET, force=output.force) as files:
        update, close = console.progress("cam")
        try:
            maps, info, image_set = compute_cams(
                model,
                data.images,
                preprocess=preprocess,
                method=cams.method,
                target=cams.target,
                options=opts,
                class_names=data.class_names,
                batch_size=runtime.batch_size,
                provider=runtime.provider,
                threads=runtime.threads,
                strict=data.strict,
                scorecam_channels=cams.scorecam_channels,
                max_memory=runtime.max_memory,
                progress=update,
            )
        finally:
            close()
        console.info(f"preprocess: {image_set.preprocess.describe()}")
        _provider_note(console, info)
        write_npz(files.path("cams.npz"), maps.arrays())
        if output.overlays:
            index = {p: i for i, p in enumerate(image_set.paths)}
            for k, p in enumerate(maps.paths):
                rgb = image_set.display_image(index[p])
                write_png(
                    files.path("overlays") / overlay_name(p), overlay_image(rgb, maps.maps[k])
                )
        files.commit()
    _report_skipped(console, image_set)
    from onnx_sp2ps.files import show

    click.echo(f"{len(maps.paths)} maps ({cams.method}) written to {show(files.out / 'cams.npz')}")
    return EXIT_OK


#: The files each command writes under --out, replaced as one set.
CAM_SET = ("cams.npz", "overlays")
AUDIT_SET = ("report.json", "samples.csv", "report.html", "overlays", "maps")
#: Characters kept as they are in overlay file names; others are %-escaped (byte-wise),
#: so that different image paths never share an overlay file.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,+=@[]()")


def _escape_name(part: str) -> str:
    raw = part.encode("utf-8", "surrogateescape")
    keep = _NAME_CHARS if part not in (".", "..") else frozenset()
    out = "".join(chr(b) if chr(b) in keep else f"%{b:02X}" for b in raw)
    if len(out) > 200:  # file names are limited to 255 bytes
        import hashlib

        out = out[:160] + "~" + hashlib.sha256(raw).hexdigest()[:32]
    return out


def overlay_name(path: str) -> str:
    """The overlay file of an image path, relative to a model's overlay folder: the
    path's folders kept, each part %-escaped, ``.png`` added (``0/cat.jpg`` ->
    ``0/cat.jpg.png``, a row of an array ``x.npy[12]`` -> ``x.npy[12].png``); different
    paths always give different files (``a b.png``, ``a_b.png``, ``a_b.jpg``)."""
    return "/".join(_escape_name(part) for part in path.split("/")) + ".png"


def _model_folders(paths: list[str]) -> list[str]:
    """One overlay/maps folder per model, from its path's distinct ending (a path given
    twice gets ``_2``)."""
    from onnx_sp2ps.pipeline import path_endings

    used: set[str] = set()
    out = []
    named: list[str | None] = list(paths)
    for name in path_endings(named):
        stem = name[:-5] if name.endswith(".onnx") else name
        base = _escape_name(stem.replace("/", "_").replace(" ", "_")) or "model"
        folder, k = base, 2
        while folder in used:
            folder, k = f"{base}_{k}", k + 1
        used.add(folder)
        out.append(folder)
    return out


def _check_out_not_in_images(out: Path, images: Path) -> None:
    """An --out inside the --images folder would have its overlays scored next time."""
    import os

    from onnx_sp2ps.errors import ReportError
    from onnx_sp2ps.files import show

    if not os.path.isdir(images):
        return
    root, target = os.path.realpath(images), os.path.realpath(out)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise ReportError(
            f"--out {show(out)} is inside the --images folder {show(images)}: "
            "a later run would read its overlays as images; choose a folder "
            "outside it"
        )


def _provider_note(console: _Console, info) -> None:
    """The one line about a CUDA fallback (always shown), else the providers used."""
    if info.provider_note:
        _err(f"note: {info.provider_note}")
    else:
        console.info(f"providers: {', '.join(info.providers)}")


#: An interval of the mean wider than this (half-width) gets the note of
#: :func:`_wide_interval_note`.
WIDE_HALF_WIDTH = 0.01


def _wide_interval_note(console: _Console, result: AuditResult) -> None:
    """One line when the widest interval of a candidate's mean has a half-width over
    0.01: about how many images would give 0.01, from the observed variance."""
    from onnx_sp2ps.intervals import images_for_half_width

    widest = max(
        (c for c in result.candidates if c.intervals is not None),
        key=lambda c: c.intervals.mean.half_width if c.intervals else 0.0,
        default=None,
    )
    if widest is None or widest.intervals is None:
        return
    ci = widest.intervals
    if not ci.mean.half_width > WIDE_HALF_WIDTH:
        return
    needed = images_for_half_width(widest.scores.score, WIDE_HALF_WIDTH, ci.settings.confidence)
    if needed is None:
        return
    console.info(
        f"note: the {ci.settings.confidence:.0%} interval of the Sp2PS mean is "
        f"±{ci.mean.half_width:.3f} ({widest.model.name}, {len(widest.scores.score)} images); "
        f"about {needed:,} images would give ±{WIDE_HALF_WIDTH}"
    )


def _report_skipped(console: _Console, image_set) -> None:
    if image_set.skipped:
        _err(
            f"skipped {len(image_set.skipped)} unreadable image(s) or folder(s), e.g. "
            f"{image_set.skipped[0][0]}: {image_set.skipped[0][1]}"
        )


@cli.command()
@click.argument("original", type=_PATH)
@click.argument("candidates", nargs=-1, required=True, type=_PATH)
@ImageOptions.options("images")
@AuditOutput.options("out", "fmt")
@GateOptions.options()
@IntervalOptions.options()
@AuditOutput.options("junit", "summary_md", "save_maps", "worst", "overlays")
@CamOptions.options(audit=True)
@AuditOutput.options("force", "original_cache")
@ShardOptions.options()
@PreprocessOptions.options()
@ImageOptions.options("class_names", "strict")
@ModelOverrides.options(candidates=True)
@RuntimeOptions.options()
@EngineOptions.options()
@CommonOptions.options()
def audit(original: Path, candidates: tuple[Path, ...], **params: Any) -> int:
    """Score CANDIDATES against ORIGINAL: Sp2PS of their CAMs on the images."""
    import onnx_sp2ps.pipeline as audit_module
    from onnx_sp2ps.gate import apply_gate
    from onnx_sp2ps.pipeline import audit_to_dict
    from onnx_sp2ps.report import ReportSet, check_target, format_table

    console = CommonOptions.from_params(params).console
    output = AuditOutput.from_params(params)
    data = ImageOptions.from_params(params)
    runtime = RuntimeOptions.from_params(params)
    cams = CamOptions.from_params(params, audit=True)
    criteria = GateOptions.from_params(params).criteria()
    intervals = IntervalOptions.from_params(params).settings()
    preprocess = PreprocessOptions.from_params(params).preprocess()
    models = ModelOverrides.from_params(params, candidates=True)
    shard = ShardOptions.from_params(params).shard
    engine = EngineOptions.from_params(params)
    _no_params_left(params)
    if shard is not None:
        if engine.engine != "local":
            raise click.UsageError(
                "--shard runs one shard in this process: start each shard as its own job, "
                "or run the whole audit with --engine ray and no --shard"
            )
        return _audit_shard(
            original, candidates, shard, console, output, data, runtime, cams, preprocess, models
        )
    run_audit = engine.audit_function(runtime.provider)
    if output.junit is not None:
        check_target(output.junit, option="--junit", force=output.force)
    if output.summary_md is not None:
        check_target(output.summary_md, option="--summary-md", force=True)
    settings = _audit_settings(
        cams, runtime, data, output, threshold=criteria.fail_under, intervals=intervals
    )
    folders = _model_folders([str(original), *map(str, candidates)])
    files = None
    if output.out is not None:
        _check_out_not_in_images(output.out, data.images)
        files = ReportSet(output.out, AUDIT_SET, force=output.force)
    try:
        update, close = console.progress("audit")
        streamer = (
            _OverlayStreamer(files.path("overlays"), folders)
            if (files is not None and output.overlays == "all")
            else None
        )
        try:
            with _cache_notes():
                result = run_audit(
                    original,
                    list(candidates),
                    data.images,
                    preprocess=preprocess,
                    settings=settings,
                    original_options=models.model,
                    candidate_options=models.candidates,
                    class_names=data.class_names,
                    keep_maps=output.save_maps,
                    worst=output.worst if files is not None else 0,
                    on_maps=streamer,
                    progress=update,
                )
        finally:
            close()
        console.info(f"preprocess: {result.images.preprocess.describe()}")
        _provider_note(console, result.original)
        _report_skipped(console, result.images)
        _wide_interval_note(console, result)
        report = audit_to_dict(result, schema_version=audit_module.SCHEMA_VERSION)
        report["setting_sources"] = setting_sources(click.get_current_context())
        # The gate is checked once; the table, the files and the exit code show it.
        checks = apply_gate(report, criteria) if criteria.any() else []
        if files is not None:
            _write_report_set(files, result, report, folders, output)
            console.info(f"report written to {files.out / 'report.json'}")  # _err escapes
    finally:
        if files is not None:
            files.discard()
    _write_gate_files(output, report, checks)
    if output.fmt == "json":
        click.echo(json.dumps(report, indent=2, allow_nan=False))
    else:
        click.echo(format_table(report))
    if not criteria.any():
        return EXIT_OK
    return _gate(checks, to_stderr=output.fmt == "json")


def _write_report_set(
    files: ReportSet,
    result: AuditResult,
    report: dict[str, Any],
    folders: list[str],
    output: AuditOutput,
) -> None:
    """report.json, samples.csv, report.html (with the worst images' overlays) and the
    saved maps, into the staged report set, which is then swapped in."""
    from onnx_sp2ps.report import html_report, samples_csv, write_atomic, write_json

    overlays = files.path("overlays") if output.overlays == "worst" else None
    page = html_report(
        report,
        _worst_images(result, report, folders, overlays),
        class_names=result.images.class_names,
    )
    table = samples_csv(report).encode("utf-8")
    write_atomic(files.path("samples.csv"), lambda h: h.write(table))
    write_atomic(files.path("report.html"), lambda h: h.write(page.encode("utf-8")))
    if output.save_maps:
        _save_maps(files.path("maps"), result, folders)
    write_json(files.path("report.json"), report)
    files.commit()


def _write_gate_files(output: AuditOutput, report: dict[str, Any], checks: list[GateCheck]) -> None:
    """--junit (replaced whole) and --summary-md (appended to)."""
    from onnx_sp2ps.report import append_text, junit_xml, summary_markdown, write_atomic

    if output.junit is not None:
        text = junit_xml(report, checks).encode("utf-8")
        write_atomic(output.junit, lambda h: h.write(text), option="--junit")
    if output.summary_md is not None:
        append_text(output.summary_md, summary_markdown(report, checks), option="--summary-md")


class _OverlayStreamer:
    """``on_maps`` callback writing every image's overlays as batches are scored."""

    def __init__(self, folder: Path, model_folders: list[str]):
        self.dirs = [folder / name for name in model_folders]

    def __call__(self, image_set, indices, original_maps, candidate_maps) -> None:
        from onnx_sp2ps.report import overlay_image, write_png

        for k, index in enumerate(indices):
            rgb = image_set.display_image(int(index))
            name = overlay_name(image_set.paths[int(index)])
            for folder, maps in zip(self.dirs, [original_maps, *candidate_maps]):
                write_png(folder / name, overlay_image(rgb, maps[k]))


def _worst_images(result, report: dict, folders: list[str], overlays: Path | None) -> dict:
    """Worst images per candidate (keyed by display name) for the HTML page, and their
    PNG overlays under ``overlays`` when given."""
    from onnx_sp2ps.report import WorstImage, overlay_image, png_bytes, write_atomic

    labels = result.labels
    out: dict = {}
    # Each PNG is encoded once: the same bytes go to the page and to the overlay file,
    # and an image among the worst of several candidates is not encoded again.
    originals: dict[int, tuple[bytes, bytes]] = {}  # index -> (image, original overlay)
    for cand, entry, folder in zip(result.candidates, report["candidates"], folders[1:]):
        rows = []
        w = cand.worst
        if w is None:
            continue
        for k, pos in enumerate(w.positions):
            index = int(result.indices[pos])
            rgb = result.images.display_image(index)
            path = result.images.paths[index]
            if index not in originals:
                original_png = png_bytes(overlay_image(rgb, w.original_maps[k]))
                originals[index] = (png_bytes(rgb), original_png)
                if overlays is not None:
                    write_atomic(
                        overlays / folders[0] / overlay_name(path),
                        lambda handle: handle.write(original_png),
                    )
            image_png, original_png = originals[index]
            candidate_png = png_bytes(overlay_image(rgb, w.candidate_maps[k]))
            if overlays is not None:
                write_atomic(
                    overlays / folder / overlay_name(path),
                    lambda handle: handle.write(candidate_png),
                )
            label = None if labels is None or labels[pos] < 0 else int(labels[pos])
            rows.append(
                WorstImage(
                    path=entry["images"][int(pos)]["path"],
                    image_png=image_png,
                    original_png=original_png,
                    candidate_png=candidate_png,
                    spatial=float(cand.scores.spatial[pos]),
                    spectral=float(cand.scores.spectral[pos]),
                    score=float(cand.scores.score[pos]),
                    prediction_original=int(result.original_predictions[pos]),
                    prediction_candidate=int(cand.predictions[pos]),
                    label=label,
                )
            )
        out[entry["model"]["name"]] = rows
    return out


def _save_maps(folder: Path, result, folders: list[str]) -> None:
    from onnx_sp2ps.report import write_npz

    models = [result.original_maps] + [c.maps for c in result.candidates]
    for name, maps in zip(folders, models):
        write_npz(folder / f"{name}.npz", maps.arrays())


def _gate(checks: list, *, to_stderr: bool = False) -> int:
    """Print the gate lines; the exit code of the verdict."""
    from onnx_sp2ps.gate import gate_lines

    for line in gate_lines(checks):
        click.echo(line, err=to_stderr)
    return EXIT_OK if checks and all(c.passed for c in checks) else EXIT_GATE


@cli.command()
@click.argument("report", type=_PATH)
@GateOptions.options()
@CommonOptions.options()
def gate(report: Path, **params: Any) -> int:
    """Re-check a saved REPORT.json against gate criteria without re-running the models."""
    from onnx_sp2ps.gate import check_report
    from onnx_sp2ps.report import load_report

    CommonOptions.from_params(params)
    criteria = GateOptions.from_params(params).criteria()
    _no_params_left(params)
    if not criteria.any():
        raise click.UsageError(
            "give at least one criterion (--fail-under, --fail-under-p5, "
            "--min-agreement, --max-accuracy-drop, --max-ci-width)"
        )
    return _gate(check_report(load_report(report), criteria))


# --------------------------------------------------------------------------- shards

#: Options of audit that belong to the merge of shards (a usage error with --shard when
#: given on the command line; ignored there when they come from a config file).
_GATE_PARAMS = (
    "fail_under",
    "fail_under_p5",
    "min_agreement",
    "max_accuracy_drop",
    "gate_on",
    "max_ci_width",
    "confidence",
    "resamples",
    "junit",
    "summary_md",
)


def _audit_settings(
    cams: CamOptions,
    runtime: RuntimeOptions,
    data: ImageOptions,
    output: AuditOutput,
    *,
    threshold: float | None,
    intervals: IntervalSettings | None = None,
) -> AuditSettings:
    """The settings of an audit or a shard; a bad --original-cache folder is exit 3 here,
    before --out is touched."""
    from onnx_sp2ps.intervals import IntervalSettings
    from onnx_sp2ps.pipeline import AuditSettings

    if output.original_cache is not None:
        from onnx_sp2ps.cache import check_folder

        check_folder(output.original_cache)
    return AuditSettings(
        method=cams.method,
        target=cams.target,
        batch_size=runtime.batch_size,
        provider=runtime.provider,
        threads=runtime.threads,
        threshold=threshold,
        strict=data.strict,
        scorecam_channels=cams.scorecam_channels,
        max_memory=runtime.max_memory,
        original_cache=None if output.original_cache is None else str(output.original_cache),
        intervals=intervals or IntervalSettings(),
    )


def _audit_shard(
    original: Path,
    candidates: tuple[Path, ...],
    shard: tuple[int, int],
    console: _Console,
    output: AuditOutput,
    data: ImageOptions,
    runtime: RuntimeOptions,
    cams: CamOptions,
    preprocess: Preprocess,
    models: ModelOverrides,
) -> int:
    """``audit --shard K/N --out DIR``: score shard K of N and write its records and
    identity into DIR as one set (onnx_sp2ps.shards)."""
    from dataclasses import asdict

    from click.core import ParameterSource

    import onnx_sp2ps.pipeline as audit_module
    from onnx_sp2ps.files import show
    from onnx_sp2ps.report import ReportSet
    from onnx_sp2ps.shards import SHARD_SET, shard_identity, write_shard

    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    for name in _GATE_PARAMS:
        if ctx.params.get(name) is not None and ctx.get_parameter_source(name) in given:
            option = "--" + name.replace("_", "-")
            raise click.UsageError(
                f"{option} with --shard: gates belong to the merge (onnx-sp2ps merge "
                f"SHARD_DIR... --out DIR {option} ...)"
            )
    if output.out is None:
        raise click.UsageError("--shard needs --out (the folder for the shard's records)")
    k, n = shard
    settings = _audit_settings(cams, runtime, data, output, threshold=None)
    _check_out_not_in_images(output.out, data.images)
    files = ReportSet(output.out, SHARD_SET, force=output.force)
    try:
        update, close = console.progress(f"shard {k}/{n}")
        try:
            with _cache_notes():
                records, context = audit_module.audit_records(
                    original,
                    list(candidates),
                    data.images,
                    preprocess=preprocess,
                    settings=settings,
                    original_options=models.model,
                    candidate_options=models.candidates,
                    class_names=data.class_names,
                    # the merge draws every overlay from kept maps
                    keep_maps=output.save_maps or output.overlays == "all",
                    worst=output.worst,
                    progress=update,
                    shard=shard,
                )
        finally:
            close()
        console.info(f"preprocess: {context.images.preprocess.describe()}")
        _provider_note(console, context.original)
        identity = shard_identity(
            records,
            context,
            shard=shard,
            models=[str(original), *map(str, candidates)],
            images=str(data.images),
            preprocess=preprocess,
            options={"original": asdict(models.model), "candidates": asdict(models.candidates)},
            worst=output.worst,
            save_maps=output.save_maps,
            overlays=output.overlays,
            setting_sources=setting_sources(ctx),
        )
        write_shard(files, records, identity)
    finally:
        files.discard()
    start, stop = identity["shard"]["start"], identity["shard"]["stop"]
    summary = {
        "shard": f"{k}/{n}",
        "positions": [start, stop],
        "scored": len(records),
        "unreadable": len(records.failures),
        "out": show(files.out),
    }
    if output.fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"shard {k}/{n}: images {start} to {stop - 1 if stop > start else start} "
            f"({len(records)} scored, {len(records.failures)} unreadable) written to "
            f"{summary['out']}; merge all {n} with onnx-sp2ps merge"
        )
    return EXIT_OK


def _merged_sources(recorded: dict[str, str], ctx: click.Context) -> dict[str, str]:
    """setting_sources of a merged report: the shards' (as audit's), with the merge's
    own options where the merge set them (--worst, --overlays and --images left at
    their defaults are the shards')."""
    out = dict(recorded)
    mine = setting_sources(ctx)
    for key, source in mine.items():
        if key in out and not (source == "default" and key in ("worst", "overlays", "images")):
            out[key] = source
    return out


@cli.command()
@click.argument("shards", nargs=-1, required=True, type=_PATH)
@MergeOutput.options("out", "fmt")
@GateOptions.options()
@IntervalOptions.options()
@MergeOutput.options("junit", "summary_md", "worst", "overlays", "force", "images", "max_memory")
@CommonOptions.options()
def merge(shards: tuple[Path, ...], **params: Any) -> int:
    """Merge the SHARDS of one audit (folders written by audit --shard K/N --out) into
    the report set one audit of all the images writes; gate it."""
    from onnx_sp2ps.files import show
    from onnx_sp2ps.gate import apply_gate
    from onnx_sp2ps.pipeline import SCHEMA_VERSION, audit_to_dict, summarise
    from onnx_sp2ps.report import ReportSet, check_target, format_table
    from onnx_sp2ps.shards import merge_shards, merged_context, read_shards, reopen_images

    console = CommonOptions.from_params(params).console
    merged = MergeOutput.from_params(params)
    criteria = GateOptions.from_params(params).criteria()
    intervals = IntervalOptions.from_params(params).settings()
    _no_params_left(params)
    found = read_shards(shards)
    identity = found[0].identity
    kept = identity["report"]
    worst = kept["worst"] if merged.worst is None else merged.worst
    if worst > kept["worst"]:
        raise click.UsageError(
            f"--worst {worst} is more than the shards kept ({kept['worst']}): re-run the "
            f"shards with --worst {worst} or more"
        )
    overlays = merged.overlays or kept["overlays"]
    if overlays == "all" and not (kept["save_maps"] or kept["overlays"] == "all"):
        raise click.UsageError(
            "--overlays all needs every map, which the shards did not keep: re-run the "
            "shards with --overlays all (or --save-maps)"
        )
    output = AuditOutput(
        out=merged.out,
        fmt=merged.fmt,
        junit=merged.junit,
        summary_md=merged.summary_md,
        save_maps=kept["save_maps"],
        worst=worst,
        overlays=overlays,
        force=merged.force,
        original_cache=None,  # (the merge runs no model)
    )
    if output.junit is not None:
        check_target(output.junit, option="--junit", force=output.force)
    if output.summary_md is not None:
        check_target(output.summary_md, option="--summary-md", force=True)
    image_set = reopen_images(identity, images=merged.images, max_memory=merged.max_memory)
    _check_out_not_in_images(merged.out, merged.images or Path(identity["images"]["path"]))
    folders = _model_folders([m["path"] for m in identity["models"]])
    files = ReportSet(merged.out, AUDIT_SET, force=merged.force)
    try:
        records = merge_shards(found, max_memory=merged.max_memory, worst=worst)
        context = merged_context(
            identity,
            image_set,
            threshold=criteria.fail_under,
            max_memory=merged.max_memory,
            intervals=intervals,
        )
        result = summarise(records, context)
        console.info(f"preprocess: {result.images.preprocess.describe()}")
        _provider_note(console, result.original)
        _report_skipped(console, result.images)
        _wide_interval_note(console, result)
        report = audit_to_dict(result, schema_version=SCHEMA_VERSION)
        report["setting_sources"] = _merged_sources(
            identity["setting_sources"], click.get_current_context()
        )
        report["shards"] = {"count": len(found), "folders": [show(s.folder) for s in found]}
        checks = apply_gate(report, criteria) if criteria.any() else []
        if overlays == "all":
            _overlays_from_maps(_OverlayStreamer(files.path("overlays"), folders), result)
        _write_report_set(files, result, report, folders, output)
        console.info(f"report written to {files.out / 'report.json'}")
    finally:
        files.discard()
    _write_gate_files(output, report, checks)
    if output.fmt == "json":
        click.echo(json.dumps(report, indent=2, allow_nan=False))
    else:
        click.echo(format_table(report))
    if not criteria.any():
        return EXIT_OK
    return _gate(checks, to_stderr=output.fmt == "json")


def _overlays_from_maps(streamer: _OverlayStreamer, result: AuditResult, rows: int = 64) -> None:
    """Every image's overlays from the maps the records kept, as audit streams them."""
    original = result.original_maps
    candidates = [c.maps for c in result.candidates]
    if original is None or any(m is None for m in candidates):
        raise UsageError("--overlays all needs every map: re-run the shards with --overlays all")
    for start in range(0, len(result.indices), rows):
        part = slice(start, start + rows)
        streamer(
            result.images,
            result.indices[part],
            original.maps[part],
            [m.maps[part] for m in candidates if m is not None],
        )


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with its code; see the module docstring for the codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    from onnx_sp2ps.files import install_signal_handlers

    restore = install_signal_handlers()
    try:
        code = _run(args, debug)
    except Interrupted as exc:  # a signal during the error handling itself
        code = _interrupted(exc.signum)
    finally:
        restore()
    if code is None:
        code = EXIT_OK
    if argv is None:
        # The command's process ends now, with our handlers still in place: a decoding
        # thread busy with a file must not delay it, and a signal during the
        # interpreter's own shutdown (whose handlers are the defaults) must not turn a
        # finished run into a death by that signal. Every file was written and closed
        # (or removed) on the way here.
        try:
            sys.stdout.flush()
        except OSError:  # a closed pipe: what was printed is all that can be
            pass
        sys.stderr.flush()
        os._exit(int(code))
    sys.exit(int(code))


def _interrupted(signum: int) -> int:
    from onnx_sp2ps.files import announce_ending

    exc = Interrupted(signum)
    announce_ending()
    _err(exc.message)
    return exc.exit_code


def _run(args: list[str], debug: bool) -> int | None:
    try:
        return cli.main(args=args, prog_name="onnx-sp2ps", standalone_mode=False)
    except Interrupted as exc:
        return _interrupted(exc.signum)
    except (Exception, KeyboardInterrupt):
        from onnx_sp2ps.files import signal_received

        signum = signal_received()
        if signum is None:
            return _error(args, debug)
        # A signal came first: what failed after it (an import it cut short, which
        # onnxruntime cannot then repeat) is the interruption's doing.
        return _interrupted(signum)


def _error(args: list[str], debug: bool) -> int:
    """The exit code and the one line of the exception being handled."""
    try:
        raise
    except Interrupted as exc:
        return _interrupted(exc.signum)
    except (KeyboardInterrupt, click.exceptions.Abort):
        return _interrupted(signal.SIGINT)
    except click.UsageError as exc:  # one line, like every other error
        where = exc.ctx.command_path if exc.ctx is not None else "onnx-sp2ps"
        message = " ".join(exc.format_message().split()).rstrip(".")
        _err(f"usage error: {message}: see {where} --help")
        return EXIT_USAGE
    except click.ClickException as exc:  # never exit 1, which means a failed gate
        _err(f"error: {' '.join(exc.format_message().split())}")
        return EXIT_INPUT
    except InputError as exc:
        _err(f"error: {exc}")
        return EXIT_INPUT
    except UsageError as exc:
        _err(f"usage error: {exc}")
        return EXIT_USAGE
    except MemoryError:
        _err(
            "error: out of memory: the inputs need more memory than this machine has; "
            "use a smaller --batch-size or --size, or a machine with more memory"
        )
        return EXIT_INPUT
    except Sp2psError as exc:
        _err(f"error: {exc}")
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: never let it look like a failed gate
        if debug:
            traceback.print_exc()
        _err(
            f"internal error: {type(exc).__name__}: {exc} (run with --debug for the "
            "traceback, and please report it)"
        )
        return EXIT_INTERNAL
