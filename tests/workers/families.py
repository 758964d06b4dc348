"""Several parity runs in one launched job (process start-up dominates on 2 cores): one per model family.

``families.py CASES_JSON OUT_DIR``: CASES_JSON maps a name to a parity case; each runs through
:func:`tests.workers.parity.run` in turn and writes ``OUT_DIR/<name>.json`` on rank 0. A case that is expected
to be refused (``expect_error``) records the error message instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tests.workers.parity import run  # noqa: E402
from lightning_ulysses.parallel.layout import exit_distributed  # noqa: E402


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    for name, case in cases.items():
        if case.get("expect_error"):
            try:
                run(case, str(out / f"{name}.json"))
            except (ValueError, SystemExit) as exc:  # rank 0 raises, the others stop quietly (SystemExit)
                if int(os.environ["RANK"]) == 0:
                    (out / f"{name}.json").write_text(json.dumps({"error": str(exc)}))
            continue
        run(case, str(out / f"{name}.json"))
    exit_distributed()


if __name__ == "__main__":
    main()
