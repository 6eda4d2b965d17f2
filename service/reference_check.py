"""The service's torch reference check, run in a child process (``python -m service.reference_check``).

With the onnx explain engine the server never uses the torch copy; it only has to agree with the graph. Building
it is the biggest allocation a server makes: torch's libraries, the copy and a backward pass through the network
add ~1.2 GB of RSS to a 0.2 GB process (DenseNet-121), most of which glibc keeps after the copy is dropped, and torch
imports more of itself (sympy) when first used. A server that checked in-process grew by that step minutes into
its first load, whenever the check (at low priority) got the CPU. In a child, all of it goes back to the system
when the child exits, and the server process never imports torch.

The child loads the bundle as the server did, runs :meth:`Predictor.verify_reference`, refuses a bundle whose
digest is not the one the server loaded, and prints one JSON line: ``{"passed": true, "parity_max_abs_diff": x}``
or ``{"passed": false, "reason": "..."}`` (a sentence for clients: the folder's name, never its path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from service.logging_setup import configure_logging
from service.model.bundle import BundleError, bundle_problem

logger = logging.getLogger(__name__)

CHILD_NICENESS = 10  # the check takes the CPU that requests leave
STOP_POLL_S = 0.5  # how often a waiting parent looks at its stop event


@dataclass(frozen=True)
class ReferenceResult:
    """What the child found: passed with the max logit difference, or failed with a sentence for clients."""

    passed: bool
    parity_max_abs_diff: float | None = None
    reason: str = ""


def check_in_child(
    model_dir: str | Path,
    providers: Sequence[str],
    digest: str,
    stop: threading.Event | None = None,
    *,
    log_level: str = "INFO",
    log_format: str = "text",
) -> ReferenceResult | None:
    """Run the check in a child process and wait for it; None when ``stop`` was set first (the child is killed).

    The child's log lines go to this process's stderr, in the same format."""
    command = [sys.executable, "-m", "service.reference_check", str(model_dir), "--digest", digest]
    command += ["--providers", ",".join(providers), "--log-level", log_level, "--log-format", log_format]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    while True:
        try:
            out, _ = child.communicate(timeout=STOP_POLL_S)  # a retry after a timeout loses no output
            break
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                # Stopping kills the child: nothing of it is kept, and a shutdown does not wait for torch.
                child.kill()
                child.communicate()
                return None
    try:
        return ReferenceResult(**json.loads(out.strip().splitlines()[-1]))
    except (IndexError, ValueError, TypeError):
        return ReferenceResult(
            False, reason=f"The torch reference check of the model bundle failed (exit status {child.returncode})."
        )


def check(model_dir: str, providers: Sequence[str], digest: str) -> ReferenceResult:
    """The check itself (in the child): load, verify the torch reference, compare the digest."""
    from service.predictor import Predictor

    try:
        predictor = Predictor.load(model_dir, providers, explain_engine="onnx")
        if predictor.bundle.digest != digest:
            raise BundleError(
                f"its files changed after the server loaded them (bundle sha256 {predictor.bundle.digest[:12]}, "
                f"served {digest[:12]}); restart the service to serve the new bundle."
            )
    except BundleError as err:
        return ReferenceResult(False, reason=bundle_problem(err, model_dir))
    except Exception as err:  # fail closed: whatever went wrong, the bundle is not verified
        logger.exception("the torch reference check failed")
        return ReferenceResult(
            False, reason=f"The torch reference check of the model bundle failed ({type(err).__name__})."
        )
    return ReferenceResult(True, predictor.bundle.parity_max_abs_diff)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.reference_check", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--digest", required=True, help="bundle sha256 the server loaded")
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, CHILD_NICENESS)
    result = check(args.model_dir, [p for p in args.providers.split(",") if p], args.digest)
    print(json.dumps(asdict(result)), flush=True)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
