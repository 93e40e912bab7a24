"""One training process that tunesmith started itself (torchrun child or Ray worker).

``python -m tunesmith.distributed.worker PAYLOAD.json`` (what the torchrun back-end
runs in each process) rebuilds the config from the payload
(:func:`tunesmith.core.launch.config_payload`), routes the libraries' log noise like
the ``tunesmith`` command does, and runs the same training session. User errors are
one line on stderr and the error's exit code, as from the command.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tunesmith.core.launch import ENV_LAUNCHED, config_from_payload


def prepare_process(payload: dict, launched_by: str) -> Any:
    """Environment, log routing and the config of a worker process; returns the config."""
    os.environ[ENV_LAUNCHED] = launched_by
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for key, value in (payload.get("env") or {}).items():
        os.environ.setdefault(key, value)
    try:  # the command's log routing (library noise to RUN/logs, rank 0 on the terminal)
        from tunesmith.cli import attach_run_log, quiet_libraries
    except Exception:  # noqa: BLE001 - the CLI is optional for a worker
        attach_run_log = quiet_libraries = None  # type: ignore[assignment]
    if quiet_libraries is not None:
        quiet_libraries(verbose=os.environ.get("TUNESMITH_VERBOSE") == "1")
    cfg = config_from_payload(payload)
    if attach_run_log is not None:
        attach_run_log(Path(payload["run_dir"]))
    return cfg


def run_payload(payload: dict, launched_by: str, *, resume: bool | None = None) -> dict:
    """Train as the payload says in this process; returns the session's result."""
    from tunesmith.core.session import train

    cfg = prepare_process(payload, launched_by)
    return train(cfg, resume=payload["resume"] if resume is None else resume, run_dir=payload["run_dir"])


def main(argv: list[str] | None = None) -> None:
    from tunesmith.core.errors import TunesmithError

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m tunesmith.distributed.worker PAYLOAD.json\n")
        sys.exit(2)
    payload = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        run_payload(payload, os.environ.get(ENV_LAUNCHED) or "torchrun")
    except TunesmithError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.stderr.flush()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
