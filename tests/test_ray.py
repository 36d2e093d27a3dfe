"""``audit --engine ray`` (README, "Ray"): the same outputs as one process, workers that
die are restarted with no image lost or counted twice, a missing Ray or a path the
workers cannot read is one line (exit 3), and the options are checked.

Runs on one local Ray instance of 2 CPUs shared by the module (started on first use;
``test_a_local_instance_is_started_and_shut_down_when_none_runs`` starts and stops the
engine's own). Workers get half a CPU each, so that Ray's own work never waits for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from onnx_sp2ps import pipeline, ray_engine
from onnx_sp2ps.data import Preprocess
from onnx_sp2ps.errors import DataError, InputError, UsageError
from onnx_sp2ps.pipeline import AuditSettings

from conftest import ROOT, run_cli

#: The engine's options in report.json's setting_sources: the only fields that differ.
ENGINE_SETTINGS = ("engine", "ray-address", "workers", "cpus-per-worker", "gpus-per-worker")
RAY = ("--engine", "ray", "--workers", "2", "--cpus-per-worker", "0.5")


@pytest.fixture(scope="module")
def _shutdown_at_the_end():
    yield
    ray.shutdown()


@pytest.fixture
def cluster(_shutdown_at_the_end):
    """The module's local Ray instance of 2 CPUs (started again if a test stopped it)."""
    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
        )
    yield ray
    assert not _engine_actors(), "the engine left workers running"


def _engine_actors() -> list[dict]:
    return [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(ray_engine.ACTOR_PREFIX)
    ]


def _models(samples: Path) -> list[Path]:
    return [samples / "gap_original.onnx", samples / "gap_l1_30.onnx", samples / "gap_l1_60.onnx"]


def _without_engine(report: dict) -> dict:
    sources = report.pop("setting_sources")
    report["setting_sources"] = {k: v for k, v in sources.items() if k not in ENGINE_SETTINGS}
    return report


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``; JUnit's timestamp (the time of the run) masked."""
    files = {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }
    if "junit.xml" in files:
        files["junit.xml"] = re.sub(rb'timestamp="[^"]*"', b"", files["junit.xml"])
    return files


def test_a_ray_audit_writes_what_one_process_writes(capsys, samples, tmp_path, cluster):
    """Same batches -> bit-identical per-image scores, the same report.json (but for the
    engine's settings), samples.csv, report.html, overlays of every image, saved maps,
    JUnit, table, gate lines and exit code."""
    outputs = {}
    for name, engine in (("local", ()), ("ray", RAY)):
        out = tmp_path / name
        code, stdout, stderr = run_cli(
            capsys,
            "audit",
            *_models(samples),
            "--images",
            samples / "images",
            "--batch-size",
            "4",
            "--out",
            out,
            "--overlays",
            "all",
            "--save-maps",
            "--junit",
            out / "junit.xml",
            "--fail-under",
            "0.5",
            *engine,
        )
        report = _without_engine(json.loads((out / "report.json").read_text()))
        files = _files(out)
        files.pop("report.json")
        outputs[name] = (code, stdout, report, files)
    (code, stdout, report, files), ray_run = outputs["local"], outputs["ray"]
    assert code == 1 and "FAILED |" in stdout  # gap_l1_60 scores 0.27
    assert ray_run[0] == code
    assert ray_run[1] == stdout  # table and gate lines
    assert ray_run[2] == report
    assert len(files) > 100 and ray_run[3].keys() == files.keys()
    assert ray_run[3] == files


def test_a_worker_killed_mid_run_is_restarted_and_no_image_is_lost_or_counted_twice(
    samples, cluster
):
    models = _models(samples)
    settings = AuditSettings(batch_size=2)
    expected = pipeline.audit(
        models[0], models[1:], samples / "images", settings=settings, worst=5
    ).to_dict()
    killed: list[tuple[int, int]] = []
    seen: list[int] = []

    restarted: list[int] = []

    def pid() -> int:
        first = _engine_actors()[0]
        actor = ray.get_actor(first["name"], namespace=first["namespace"])
        return ray.get(actor.pid.options(concurrency_group=ray_engine.CONTROL).remote())

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if not killed:
            killed.append((pid(), done))
            os.kill(killed[0][0], signal.SIGKILL)
        elif done == total:
            restarted.append(pid())  # the same actor, in a new process

    result = ray_engine.audit(
        models[0],
        models[1:],
        samples / "images",
        settings=settings,
        worst=5,
        progress=progress,
        options=ray_engine.RayOptions(workers=2, cpus_per_worker=0.5),
    )
    assert killed and killed[0][1] < 50 and seen[-1] == 50  # killed mid-run, then finished
    assert restarted and restarted[0] != killed[0][0]
    assert len(seen) == len(ray_engine.task_ranges(50, 2, 2))  # each range taken once
    assert result.to_dict() == expected


def test_without_ray_the_engine_says_how_to_install_it(capsys, samples, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as when not installed
    code, _, stderr = run_cli(
        capsys, "audit", *_models(samples)[:2], "--images", samples / "images", "--engine", "ray"
    )
    assert code == 3
    assert stderr.strip().count("\n") == 0
    assert "pip install 'onnx-sp2ps[ray]'" in stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--engine", "ray", "--workers", "0"], "--workers"),
        (["--engine", "ray", "--cpus-per-worker", "0"], "--cpus-per-worker"),
        (["--engine", "ray", "--cpus-per-worker", "-1"], "--cpus-per-worker"),
        (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker"),
        (["--engine", "spark"], "--engine"),
        (["--workers", "2"], "--workers needs --engine ray"),
        (["--ray-address", "h:1", "--cpus-per-worker", "1"], "need --engine ray"),
        (["--engine", "ray", "--gpus-per-worker", "1", "--provider", "cpu"], "--provider"),
    ],
)
def test_engine_options_are_checked(capsys, samples, options, message):
    code, _, stderr = run_cli(
        capsys, "audit", *_models(samples)[:2], "--images", samples / "images", *options
    )
    assert code == 2, stderr
    assert message in stderr and stderr.strip().count("\n") == 0


def test_the_library_checks_the_options_too():
    for bad in ({"workers": 0}, {"cpus_per_worker": 0.0}, {"gpus_per_worker": float("nan")}):
        with pytest.raises(UsageError):
            ray_engine.RayOptions(**bad)


def test_gpu_workers_ask_ray_for_gpus_and_run_cuda():
    """(No GPU here: the actor options and the worker's settings are what a GPU run
    gets; README "Ray" says how it runs.)"""
    from onnx_sp2ps.cli import EngineOptions

    run = EngineOptions("ray", None, None, None, 1.0).audit_function("auto")
    options = run.keywords["options"]  # type: ignore[attr-defined]
    assert options.actor_options()["num_gpus"] == 1.0
    assert options.actor_options()["max_restarts"] > 0
    assert options.actor_options()["max_task_retries"] > 0
    worker = options.worker_settings(AuditSettings(provider="auto"))
    assert worker.provider == "cuda" and worker.threads == 1
    assert options.worker_settings(AuditSettings(provider="cpu", threads=3)).threads == 3


def test_a_cluster_without_the_gpus_or_cpus_asked_for_is_refused(capsys, samples, cluster):
    for options, message in (
        (["--gpus-per-worker", "1"], "has 0 GPUs"),
        (["--workers", "5", "--cpus-per-worker", "1"], "has 2 CPUs"),
    ):
        code, _, stderr = run_cli(
            capsys,
            "audit",
            *_models(samples)[:2],
            "--images",
            samples / "images",
            "--engine",
            "ray",
            *options,
        )
        assert code == 3 and message in stderr and stderr.strip().count("\n") == 0


def test_images_a_worker_cannot_read_are_refused_in_one_line(
    capsys, samples, cluster, monkeypatch, tmp_path
):
    """Workers read --images from the driver's path; here they are sent elsewhere."""
    monkeypatch.setattr(ray_engine, "_shared_path", lambda images: str(tmp_path / "elsewhere"))
    code, _, stderr = run_cli(
        capsys, "audit", *_models(samples)[:2], "--images", samples / "images", *RAY
    )
    assert code == 3
    assert stderr.strip().count("\n") == 0
    assert "a Ray worker on" in stderr and "cannot use the images at" in stderr
    assert "same path" in stderr


def test_a_worker_seeing_other_files_is_refused(samples, tmp_path):
    """The fingerprint check, in this process (a worker's side of it)."""
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((samples / "images" / "0").iterdir())[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    original, _ = pipeline._prepare_all(
        samples / "gap_original.onnx",
        [],
        Preprocess(),
        AuditSettings(),
        pipeline.ModelOptions(),
        pipeline.ModelOptions(),
    )
    job = ray_engine._Job(
        str(images), Preprocess(), None, AuditSettings(), False, 0, fingerprint="other"
    )
    with pytest.raises(DataError, match="sees other files"):
        ray_engine._open_images(job, original)


def test_worker_errors_come_back_as_the_same_exception():
    failure = ray_engine._Failure.of(DataError("bad image x.png"), "10.0.0.2")
    error = failure.error()
    assert type(error) is DataError and str(error) == "bad image x.png"
    assert isinstance(ray_engine._Failure.of(MemoryError(), "n").error(), MemoryError)
    bug = ray_engine._Failure.of(ZeroDivisionError("x"), "10.0.0.2").error()
    assert type(bug) is RuntimeError and "10.0.0.2" in str(bug)  # CLI: internal error, exit 4
    assert isinstance(ray_engine._Failure("InputError", "m", "n").error(), InputError)


@pytest.mark.parametrize("total, batch, workers", [(50, 4, 2), (1, 16, 3), (1000, 16, 2)])
def test_ranges_are_whole_batches_of_one_pass_covering_every_image_once(total, batch, workers):
    ranges = ray_engine.task_ranges(total, batch, workers)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % batch == 0 and start < stop for start, stop in ranges)


def test_the_cli_joins_a_running_cluster_by_address(samples, cluster, tmp_path):
    """A fresh ``python -m onnx_sp2ps`` process joins this module's instance with
    --ray-address; its report equals the one-process report."""
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    reports = {}
    for name, engine in (("local", []), ("ray", ["--engine", "ray", "--ray-address", address])):
        subprocess.run(
            [sys.executable, "-m", "onnx_sp2ps", "audit", *map(str, _models(samples)[:2])]
            + ["--images", str(samples / "images"), "--out", str(tmp_path / name), "-q"]
            + engine
            + (["--workers", "1", "--cpus-per-worker", "0.5"] if engine else []),
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        reports[name] = _without_engine(json.loads((tmp_path / name / "report.json").read_text()))
    assert reports["ray"] == reports["local"]


def test_an_address_where_no_cluster_answers_is_refused_at_once(capsys, samples):
    ray.shutdown()  # (the module's instance is started again by the next test using it)
    start = time.monotonic()
    code, _, stderr = run_cli(
        capsys,
        "audit",
        *_models(samples)[:2],
        "--images",
        samples / "images",
        "--engine",
        "ray",
        "--ray-address",
        "127.0.0.1:1",
    )
    assert code == 3 and stderr.strip().count("\n") == 0
    assert "cannot join the Ray cluster at 127.0.0.1:1" in stderr
    assert time.monotonic() - start < 15 and not ray.is_initialized()


def test_a_local_instance_is_started_and_shut_down_when_none_runs(samples):
    """Without --ray-address, and with no Ray connection in the process, the engine
    starts its own local instance and shuts it down after; the CLI's start-up and a
    local audit import no Ray (checked in a fresh process)."""
    ray.shutdown()  # (the module's instance is started again by the next test using it)
    models = _models(samples)[:2]
    handlers = []

    def mine(signum, frame):  # pragma: no cover (never sent)
        pass

    def progress(done: int, total: int) -> None:
        assert ray.is_initialized()
        handlers.append(signal.getsignal(signal.SIGTERM))

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        result = ray_engine.audit(
            models[0],
            models[1:],
            samples / "images",
            progress=progress,
            options=ray_engine.RayOptions(workers=2, cpus_per_worker=0.5),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(result.indices) == 50
    assert not ray.is_initialized()
    # ray.init would have put its own SIGTERM handler (exit at once) in place of the CLI's
    assert handlers and all(h is mine for h in handlers)
    check = (
        "import sys; from onnx_sp2ps.cli import main\n"
        "assert 'ray' not in sys.modules\n"
        "try:\n"
        f"    main(['audit', {str(_models(samples)[0])!r}, {str(_models(samples)[1])!r}, "
        f"'--images', {str(samples / 'images')!r}, '-q'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'ray' not in sys.modules and 'onnx_sp2ps.ray_engine' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", check], env=env, check=True, capture_output=True)


def test_ray_workers_fill_and_use_the_original_cache(capsys, samples, tmp_path, cluster):
    """--original-cache with --engine ray: the workers store the original's results on
    the shared cache folder; a second Ray audit reads them, and both write what one
    process without the cache writes."""
    cache = tmp_path / "cache"
    common = [*_models(samples), "--images", samples / "images", "--batch-size", "8"]
    reports = []
    for name, extra in (
        ("plain", ()),
        ("cold", (*RAY, "--original-cache", cache)),
        ("warm", (*RAY, "--original-cache", cache)),
    ):
        code, _, err = run_cli(capsys, "audit", *common, "--out", tmp_path / name, *extra)
        assert code == 0, err
        reports.append(_without_engine(json.loads((tmp_path / name / "report.json").read_text())))
        if name == "cold":
            entries = sorted(cache.rglob("*.npz"))
            assert len(entries) == 7  # 50 images in batches of 8, written by the workers
            stamps = [p.stat().st_mtime_ns for p in entries]
    assert [p.stat().st_mtime_ns for p in sorted(cache.rglob("*.npz"))] == stamps  # reused
    assert reports[0] == reports[1] == reports[2]


def test_shard_with_the_ray_engine_is_a_usage_error(capsys, samples, tmp_path):
    code, _, err = run_cli(
        capsys,
        "audit",
        *_models(samples)[:2],
        "--images",
        samples / "images",
        "--out",
        tmp_path / "s",
        "--shard",
        "1/2",
        *RAY,
    )
    assert code == 2 and "start each shard as its own job" in err
