"""``python -m tunesmith.sweep.worker OUT_DIR WORKER PARENT_PID``: one worker of a
``tunesmith sweep --parallel K`` (takes trials from the study until enough finished;
stops when the sweep that started it has gone)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tunesmith.sweep.runner import SweepSpec, work

    args = list(sys.argv[1:] if argv is None else argv)
    out, worker, parent = args[0], int(args[1]), int(args[2])
    spec = SweepSpec.load(out)
    work(spec, worker=worker, parent=parent, say=lambda m: print(f"[worker {worker}] {m}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
