"""Write tests/fixtures/golden/: report.json files of audits on the sample models, made by
the code of the commit that runs this script (docs/architecture.md, "Golden reports").

tests/test_golden.py runs the same audits and compares: bit for bit on a machine with the
same fingerprint (ONNX Runtime's CPU kernels are chosen by instruction set, so figures may
differ in their last bits elsewhere), within 1e-9 relative otherwise.

    python scripts/make_golden.py                 # every file
    python scripts/make_golden.py --added-only    # only <case>.added.json: fields added
                                                  # since the golden reports were written
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from golden import CASES, fingerprint, run_case, split_added  # noqa: E402


def main() -> None:
    added_only = "--added-only" in sys.argv[1:]
    out = ROOT / "tests" / "fixtures" / "golden"
    out.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            report, added = split_added(run_case(name, Path(tmp)))
        report["fingerprint"] = fingerprint()
        if not added_only:
            (out / f"{name}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
            print(f"wrote {out / name}.json")
        (out / f"{name}.added.json").write_text(json.dumps(added, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out / name}.added.json")


if __name__ == "__main__":
    main()
