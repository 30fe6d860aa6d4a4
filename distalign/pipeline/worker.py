"""``python -m distalign.pipeline.worker JOB.json``: run one stage in a child process.

The runner starts this directly or under ``accelerate launch --module``; every process runs
the stage (the engine shards work across them) and the main one writes the result file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from distalign.errors import DistalignError
from distalign.pipeline.runner import call


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = call(job["target"], job["spec"])
    except DistalignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # accelerate sets RANK; absent = one process
        tmp = Path(job["result"] + ".tmp")
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
