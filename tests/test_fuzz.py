"""Attack-style tests (issue 10, section 8): seeded mutation fuzzing of the command line.

Each mutant (a mutated sample model, report.json or image folder; see ``fuzzing.py``) runs
through ``python -m onnx_sp2ps`` in its own subprocess, under a 1 GiB address-space limit
and a timeout, and must end with a documented exit code: never 4 (internal error), never a
signal, never a hang, and exactly one line on stderr with exit 2 or 3.

The seeds are fixed, so CI runs the same mutants every time and cannot fail by chance.
By default ``DEFAULT_COUNT`` mutants run (24: 40 s on 2 idle cores, one subprocess per
mutant, two at a time; most of each is the interpreter importing onnx); longer runs
(600 mutants: 13-16 minutes on 2 cores):

    SP2PS_FUZZ_COUNT=600 python -m pytest -q tests/test_fuzz.py     # 600 mutants
    SP2PS_FUZZ_SEED=7 ...                                           # other mutants

Script mode prints the count of mutants by how they ended, then each failure:

    python tests/test_fuzz.py --count 600 [--seed 0] [--jobs 2] [--seconds S]
    python tests/test_fuzz.py --replay model-field:17 --keep /tmp/replay
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzing  # noqa: E402

DEFAULT_COUNT = 24
COUNT = int(os.environ.get("SP2PS_FUZZ_COUNT", DEFAULT_COUNT))
SEED = int(os.environ.get("SP2PS_FUZZ_SEED", 0))
JOBS = int(os.environ.get("SP2PS_FUZZ_JOBS", os.cpu_count() or 2))
CATEGORIES = ["0", "1", "2", "3", "4", "signal", "hang", "other"]


class Campaign:
    """Runs the mutants on a thread pool (one subprocess each), all submitted at once so
    that the per-mutant tests below only wait for their own result."""

    def __init__(self, base: fuzzing.Base, work: Path, jobs: int = JOBS, seed: int = SEED):
        self.base, self.work, self.jobs, self.seed = base, work, jobs, seed
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.futures = {}

    def submit(self, family: str, seed: int):
        key = (family, seed)
        if key not in self.futures:
            self.futures[key] = self.pool.submit(
                fuzzing.run_mutant, family, seed, self.base, self.work / f"{family}-{seed}"
            )
        return self.futures[key]


# --------------------------------------------------------------------------- pytest

try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:
    MUTANTS = fuzzing.schedule(COUNT, SEED)

    @pytest.fixture(scope="module")
    def campaign(tmp_path_factory, request):
        base = fuzzing.make_base(tmp_path_factory.mktemp("fuzz-base"))
        camp = Campaign(base, tmp_path_factory.mktemp("fuzz-mutants"))
        wanted = [
            item.callspec.params["mutant"]
            for item in request.session.items
            if item.originalname == "test_mutant_ends_with_a_documented_exit"
        ]
        for family, seed in wanted:
            camp.submit(family, seed)
        yield camp
        camp.pool.shutdown(cancel_futures=True)

    @pytest.mark.parametrize("mutant", MUTANTS, ids=[f"{f}:{s}" for f, s in MUTANTS])
    def test_mutant_ends_with_a_documented_exit(campaign, mutant):
        m, outcome = campaign.submit(*mutant).result()
        if fuzzing.problems(m.command, outcome):
            pytest.fail(fuzzing.describe(m, outcome), pytrace=False)


def run_for(
    camp: Campaign,
    *,
    start: int,
    count: int | None = None,
    seconds: float | None = None,
    on_result=None,
    family: str | None = None,
):
    """Run ``count`` mutants (or as many as ``seconds`` allow) from index ``start``."""
    counts = collections.Counter()
    failures = []
    deadline = time.monotonic() + seconds if seconds else None
    index, inflight = start, collections.deque()
    jobs = camp.jobs
    while True:
        while (
            len(inflight) < 2 * jobs
            and (count is None or index < start + count)
            and (deadline is None or time.monotonic() < deadline)
        ):
            ((kind, seed),) = fuzzing.schedule(1, camp.seed, index)
            inflight.append(camp.submit(family or kind, seed))
            index += 1
        if not inflight:
            break
        m, outcome = inflight.popleft().result()
        counts[(m.family, outcome.category)] += 1
        if fuzzing.problems(m.command, outcome):
            failures.append(fuzzing.describe(m, outcome))
        if on_result:
            on_result(m, outcome)
    return counts, failures


def table(counts: collections.Counter) -> str:
    families = sorted({f for f, _ in counts})
    rows = [["family", *CATEGORIES, "total"]]
    for f in families + ["all"]:
        group = [f] if f != "all" else families
        per = [sum(counts[(g, c)] for g in group) for c in CATEGORIES]
        rows.append([f, *map(str, per), str(sum(per))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
        for r in rows
    )


# --------------------------------------------------------------------------- script mode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--start", type=int, default=0, help="first mutant index")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="run mutants until this many seconds have passed",
    )
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument(
        "--family", choices=sorted(set(fuzzing.FAMILIES)), help="only mutants of this family"
    )
    parser.add_argument(
        "--replay", metavar="FAMILY:SEED", help="rebuild one mutant, print its command and run it"
    )
    parser.add_argument("--keep", type=Path, help="with --replay: where to write the mutant")
    parser.add_argument("--verbose", "-v", action="store_true", help="a line per mutant")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sp2ps-fuzz-") as tmp:
        tmp = Path(tmp)
        base = fuzzing.make_base(args.keep / "base" if args.keep else tmp / "base")
        if args.replay:
            family, seed = args.replay.rsplit(":", 1)
            work = (args.keep or tmp) / f"{family}-{seed}"
            m, outcome = fuzzing.run_mutant(family, int(seed), base, work, keep=True)
            print(f"mutations: {' | '.join(m.ops)}")
            print(f"command:   PYTHONPATH={fuzzing.ROOT} python -m onnx_sp2ps {' '.join(m.args)}")
            print(
                f"exit {outcome.returncode} ({outcome.category}) in {outcome.seconds:.1f} s"
                + (f", raised at {m.site}" if m.site else "")
            )
            print(outcome.stderr)
            found = fuzzing.problems(m.command, outcome)
            print("problems: " + ("; ".join(found) or "none"))
            return 1 if found else 0

        camp = Campaign(base, tmp / "mutants", args.jobs, args.seed)
        started = time.monotonic()

        def progress(m, outcome):
            if args.verbose:
                print(
                    f"{m.key:<20} {outcome.category:>6} {outcome.seconds:5.1f}s  "
                    f"{outcome.last_line()[:110]}",
                    flush=True,
                )

        counts, failures = run_for(
            camp,
            start=args.start,
            count=None if args.seconds else args.count,
            seconds=args.seconds,
            on_result=progress,
            family=args.family,
        )
        camp.pool.shutdown()
        total = sum(counts.values())
        print(
            f"\n{total} mutants, seed {args.seed}, {time.monotonic() - started:.0f} s, "
            f"{args.jobs} jobs\n"
        )
        print(table(counts))
        print(f"\n{len(failures)} failing mutants")
        for text in failures:
            print("\n" + text)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
