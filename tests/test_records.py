"""An audit as map, merge and summarise (docs/architecture.md, "One audit"): records of
any partition of the images, merged in any grouping and order, are identical to those of
one pass; their binary form is exact and refuses damaged or hostile files."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onnx_sp2ps.data import Preprocess
from onnx_sp2ps.errors import DataError, MismatchError
from onnx_sp2ps.pipeline import (
    AuditContext,
    AuditSettings,
    ModelOptions,
    _open,
    audit,
    open_audit_models,
    score_batch,
    summarise,
    versions,
)
from onnx_sp2ps.records import (
    CandidateColumns,
    ModelColumns,
    ModelMaps,
    Records,
    WorstImages,
    merge,
    merge_stream,
)
from onnx_sp2ps.similarity import PairScores

# --------------------------------------------------------------------------- helpers


def assert_same(a: Records, b: Records) -> None:
    """Bit-identical: every array of the binary form equal in dtype, shape and bytes."""
    xa, xb = a._arrays(), b._arrays()
    assert sorted(xa) == sorted(xb)
    for key in xa:
        assert xa[key].dtype == xb[key].dtype, key
        assert xa[key].shape == xb[key].shape, key
        assert xa[key].tobytes() == xb[key].tobytes(), key


def synthetic(positions, scores, *, limit=3, size=4, seed=0, labels=True) -> Records:
    """Records of one candidate with the given positions and scores; each image's maps
    are a constant image of its position (so a map identifies its image)."""
    positions = np.asarray(positions, np.int64)
    scores = np.asarray(scores, np.float64)
    n = len(positions)
    rng = np.random.default_rng(seed)
    maps = np.repeat(positions.astype(np.float32), size * size).reshape(n, size, size)
    cols = ModelColumns(
        targets=positions % 4,
        predictions=(positions + 1) % 4,
        confidence=rng.random(n).astype(np.float32),
    )
    pair = PairScores(
        spatial=scores * 0.5,
        spectral=scores * 0.25,
        score=scores,
        finite=np.isfinite(scores),
        flat_a=positions % 2 == 0,
        flat_b=positions % 3 == 0,
    )
    worst = WorstImages.select(limit, positions, scores, maps, maps + 0.5)
    return Records(
        positions=positions,
        paths=[f"img{p}.png" for p in positions],
        labels=positions % 5 - 1 if labels else None,
        original=cols,
        candidates=(CandidateColumns(cols, pair, worst),),
    )


def rows_of(records: Records, rows) -> Records:
    """The records of some of the rows of ``records`` (worst re-selected among them),
    as a scoring of those images alone would give."""
    rows = np.asarray(rows, np.intp)

    def cols(c: ModelColumns) -> ModelColumns:
        return ModelColumns(
            c.targets[rows],
            c.predictions[rows],
            c.confidence[rows],
            None if c.maps is None else c.maps.take(rows),
        )

    cands = []
    for c, all_maps in zip(records.candidates, _candidate_maps(records)):
        scores = PairScores(**{f.name: getattr(c.scores, f.name)[rows] for f in fields(PairScores)})
        o_maps, c_maps = all_maps
        worst = WorstImages.select(
            c.worst.limit, records.positions[rows], scores.score, o_maps[rows], c_maps[rows]
        )
        cands.append(CandidateColumns(cols(c.columns), scores, worst))
    return Records(
        records.positions[rows],
        [records.paths[i] for i in rows],
        None if records.labels is None else records.labels[rows],
        cols(records.original),
        tuple(cands),
    )


def _candidate_maps(records: Records):
    if records.original.maps is not None:
        return [(records.original.maps.maps, c.columns.maps.maps) for c in records.candidates]
    # synthetic records: maps are made from positions
    out = []
    for _ in records.candidates:
        m = np.repeat(records.positions.astype(np.float32), 16).reshape(-1, 4, 4)
        out.append((m, m + 0.5))
    return out


# --------------------------------------------------------------------------- worst images


def test_worst_images_are_lowest_score_first_nan_last_ties_by_position():
    r = synthetic([5, 1, 9, 3, 7, 2], [0.5, np.nan, 0.2, 0.5, 0.2, np.nan], limit=6)
    assert r.candidates[0].worst.positions.tolist() == [7, 9, 3, 5, 1, 2]
    r = synthetic([5, 1, 9, 3, 7, 2], [0.5, np.nan, 0.2, 0.5, 0.2, np.nan], limit=3)
    assert r.candidates[0].worst.positions.tolist() == [7, 9, 3]
    # the maps travel with their images
    assert r.candidates[0].worst.original_maps[:, 0, 0].tolist() == [7, 9, 3]


def test_ties_at_the_cut_keep_the_lowest_positions_whatever_the_merge_order():
    a = synthetic([10, 11, 12], [0.3, 0.3, 0.3], limit=2)
    b = synthetic([0, 1, 2], [0.3, 0.3, 0.3], limit=2)
    for parts in ([a, b], [b, a]):
        assert merge(parts).candidates[0].worst.positions.tolist() == [0, 1]


# --------------------------------------------------------------------------- merge


@st.composite
def partitions(draw):
    n = draw(st.integers(1, 40))
    positions = np.sort(
        np.asarray(draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n, unique=True)))
    )
    pool = st.one_of(
        st.sampled_from([0.0, 0.25, 0.5, 1.0, np.nan]), st.floats(0, 1, allow_nan=False)
    )
    scores = draw(st.lists(pool, min_size=n, max_size=n))
    part_of = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    order = draw(st.permutations(range(5)))
    limit = draw(st.integers(0, 6))
    return positions, scores, part_of, order, limit


@given(partitions(), st.booleans())
def test_merging_any_partition_in_any_order_gives_the_whole(case, nested):
    positions, scores, part_of, order, limit = case
    whole = synthetic(positions, scores, limit=limit)
    parts = [rows_of(whole, [i for i, p in enumerate(part_of) if p == k]) for k in order]
    if nested:  # (a (b c)) vs ((a b) c): associativity
        got = merge([parts[0], merge([merge(parts[1:3]), merge(parts[3:])])])
    else:
        got = merge(parts)
    assert_same(got, whole)
    assert_same(merge_stream(iter(parts)), whole)


def test_merge_refuses_parts_of_different_audits_or_one_image_twice():
    a = synthetic([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(MismatchError, match="share image position 2"):
        merge([a, synthetic([2, 3], [0.1, 0.2])])
    with pytest.raises(MismatchError, match="keeps 3 vs 4 worst"):
        merge([a, synthetic([5], [0.1], limit=4)])
    with pytest.raises(MismatchError, match="labels"):
        merge([a, synthetic([5], [0.1], labels=False)])
    two = replace(a, candidates=a.candidates * 2)
    with pytest.raises(MismatchError, match="1 vs 2 candidates"):
        merge([a, replace(two, positions=np.array([7, 8, 9]))])
    with pytest.raises(MismatchError, match="nothing to merge"):
        merge([])
    assert merge_stream(iter([])) is None


# --------------------------------------------------------------------------- binary form


@given(partitions())
def test_binary_form_is_exact(case):
    positions, scores, _, _, limit = case
    r = synthetic(positions, scores, limit=limit)
    assert_same(Records.from_npz(r.to_bytes()), r)


def _npz(arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _damaged():
    good = synthetic([0, 1, 2], [0.1, 0.2, 0.3])._arrays()
    yield "garbage", b"not a zip file at all"
    yield "truncated", _npz(good)[:200]
    yield "format", _npz({**good, "format": np.array("something-else/1")})
    yield "missing array", _npz({k: v for k, v in good.items() if k != "candidate0.targets"})
    yield "wrong dtype", _npz({**good, "positions": good["positions"].astype(np.int32)})
    yield "wrong length", _npz({**good, "paths": good["paths"][:2]})
    yield "descending", _npz({**good, "positions": good["positions"][::-1].copy()})
    yield "negative", _npz({**good, "positions": good["positions"] - 1})
    yield "worst elsewhere", _npz({**good, "candidate0.worst.positions": np.array([0, 1, 99])})
    yield "too many worst", _npz({**good, "candidate0.worst.limit": np.array(1)})
    yield "no candidates", _npz({**good, "candidates": np.array(0)})
    yield "object array", _npz({**good, "paths": np.array(["a", 1, None], dtype=object)})


@pytest.mark.parametrize("name,data", list(_damaged()), ids=[n for n, _ in _damaged()])
def test_damaged_or_hostile_records_files_are_refused_with_a_data_error(name, data):
    with pytest.raises(DataError, match="records file"):
        Records.from_npz(data)


def test_a_records_file_that_would_inflate_past_the_budget_is_refused_unread():
    out = io.BytesIO()
    np.savez_compressed(out, **{**synthetic([0], [0.5])._arrays(), "pad": np.zeros(10**7)})
    assert len(out.getvalue()) < 10**6  # 80 MB of zeros in a small file
    with pytest.raises(DataError, match="over the memory budget of 1.0 MiB"):
        Records.from_npz(out.getvalue(), max_memory=2**20)


def test_records_files_are_plain_arrays_without_pickles():
    data = synthetic([0, 1], [0.5, 0.7]).to_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for name in z.namelist():
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                dtype = read_header(f)[2]
                assert not dtype.hasobject, name
    keys = sorted(n.removesuffix(".npy") for n in zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert "allow_pickle" not in keys and "positions" in keys


# --------------------------------------------------------------------------- on models


@pytest.fixture(scope="module")
def sample_audit(samples):
    """Per-batch records of the sample gap models (batches of 7), with every map kept."""
    settings = AuditSettings(batch_size=7)
    models = open_audit_models(
        samples / "gap_original.onnx",
        [samples / "gap_l1_30.onnx", samples / "gap_random_60_ft.onnx"],
        preprocess=Preprocess(),
        settings=settings,
        original_options=ModelOptions(),
        candidate_options=ModelOptions(),
        keep_maps=True,
        worst=5,
    )
    images = _open(
        samples / "images", models.original.prepared.spec, Preprocess(), None, False, None
    )
    parts = [score_batch(models, b, images) for b in images.iter_batches(7)]
    context = AuditContext(
        settings=settings,
        images=images,
        original=models.original.info,
        candidates=tuple(c.info for c in models.candidates),
        provider_note=None,
        versions=versions(),
    )
    return parts, context


def test_merged_batches_in_any_order_summarise_to_the_audits_report(sample_audit, samples):
    parts, context = sample_audit
    rng = np.random.default_rng(0)
    shuffled = [parts[i] for i in rng.permutation(len(parts))]
    via_shards = merge([merge(shuffled[:3]), merge(shuffled[3:])])
    assert_same(via_shards, merge(parts))
    assert_same(Records.from_npz(via_shards.to_bytes()), via_shards)

    result = audit(
        samples / "gap_original.onnx",
        [samples / "gap_l1_30.onnx", samples / "gap_random_60_ft.onnx"],
        samples / "images",
        settings=context.settings,
        keep_maps=True,
        worst=5,
    )
    summarised = summarise(via_shards, context)
    assert json.dumps(summarised.to_dict()) == json.dumps(result.to_dict())
    for got, want in zip(summarised.candidates, result.candidates):
        assert got.worst.positions.tolist() == want.worst.positions.tolist()
        np.testing.assert_array_equal(got.worst.candidate_maps, want.worst.candidate_maps)
        np.testing.assert_array_equal(got.maps.maps, want.maps.maps)


def test_the_worst_rows_of_a_result_point_at_its_lowest_scores(sample_audit):
    parts, context = sample_audit
    result = summarise(merge(parts), context)
    for cand in result.candidates:
        rows = cand.worst.positions
        assert len(rows) == 5
        np.testing.assert_array_equal(cand.scores.score[rows], np.sort(cand.scores.score)[:5])
        np.testing.assert_array_equal(cand.worst.candidate_maps, cand.maps.maps[rows])


def test_a_records_file_round_trips_through_disk(sample_audit, tmp_path):
    parts, _ = sample_audit
    merged = merge(parts)
    path = tmp_path / "part.npz"
    with open(path, "wb") as f:
        merged.to_npz(f)
    with open(path, "rb") as f:
        assert_same(Records.from_npz(f), merged)
    assert isinstance(merged.original.maps, ModelMaps)


# --------------------------------------------------------------------------- shards


@given(st.integers(0, 500), st.integers(1, 40), st.integers(1, 12))
def test_shards_cover_the_set_in_contiguous_batch_aligned_runs(total, batch, n):
    from onnx_sp2ps.pipeline import shard_range

    ranges = [shard_range(total, batch, (k, n)) for k in range(1, n + 1)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, a1), (b0, _) in zip(ranges, ranges[1:]):
        assert a1 == b0
    for start, stop in ranges:
        assert start <= stop and start % batch == 0
        assert stop == total or stop % batch == 0


def test_shard_numbers_out_of_range_are_usage_errors():
    from onnx_sp2ps.errors import UsageError
    from onnx_sp2ps.pipeline import shard_range

    for bad in [(0, 3), (4, 3), (1, 0)]:
        with pytest.raises(UsageError, match="1 <= K <= N"):
            shard_range(10, 2, bad)


def test_shards_merged_in_any_order_equal_the_whole_audit(samples, tmp_path):
    """Three shards of a folder with an unreadable image: merged in any order, their
    records (undecodable images included) and report equal one pass's."""
    import shutil

    from onnx_sp2ps.pipeline import audit_records

    images = tmp_path / "images"
    shutil.copytree(samples / "images", images)
    (images / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    models = [samples / "gap_original.onnx", [samples / "gap_l1_60.onnx"]]
    settings = AuditSettings(batch_size=8)
    whole, context = audit_records(*models, images, settings=settings, worst=4)
    assert len(whole.failures) == 1
    shards = [
        audit_records(*models, images, settings=settings, worst=4, shard=(k, 3))[0]
        for k in (1, 2, 3)
    ]
    assert sum(len(s) for s in shards) == len(whole)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        assert_same(merge([shards[i] for i in order]), whole)
    merged = merge(shards[::-1])
    assert merged.failures == whole.failures
    broken = next(iter(whole.failures))
    other = next(k for k, s in zip((1, 2, 3), shards) if broken not in s.failures)
    fresh = audit_records(*models, images, settings=settings, worst=4, shard=(other, 3))[1]
    assert fresh.images.skipped == []  # a part that never read the broken image
    report = summarise(merged, fresh).to_dict()
    assert report["images"]["skipped"] == summarise(whole, context).to_dict()["images"]["skipped"]
    assert json.dumps(report) == json.dumps(summarise(whole, context).to_dict())
