"""Re-choose the decision rule of an existing bundle: the same network and temperature, a new threshold.

    bundle + labelled splits of its split.csv --scored through ONNX Runtime, as the service scores--> P(positive)
           --threshold for the target sensitivity on the ``chosen_on`` splits, leave-one-source-out estimate-->
           a copy of the bundle with the new ``decision``, every split's figures re-scored, manifest written last

What a threshold chosen on one hospital's positives gives on another hospital's is the question a triage rule
has to answer: ``training.metrics.leave_one_source_out`` answers it from the sources there are, and the card
keeps that estimate next to the rule (``decision.leave_one_source_out``). Training runs choose their rule the
same way (``Run.calibrate``); this is for a bundle whose run folder is gone.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.model.bundle import (
    CARD_FILE,
    FEATURES_NAME,
    MANIFEST_FILE,
    OUTPUT_NAME,
    LoadedBundle,
    git_commit,
    has_output,
    load_bundle,
    write_card,
)
from service.model.decision import Decision
from service.model.probabilities import softmax
from training import metrics as mt
from training.quantize import CPU, LabelledImages, score_images, split_metrics

logger = logging.getLogger(__name__)


def next_version(version: str) -> str:
    """One more than an integer version (a changed rule is a changed model), else ``VERSION-op``."""
    return str(int(version) + 1) if version.isdigit() else f"{version}-op"


def rechoose_operating_point(
    source_dir: Path,
    out_dir: Path,
    evaluation: Mapping[str, LabelledImages],
    chosen_on: Sequence[str],
    target_sensitivity: float,
    *,
    version: str | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Write a copy of the bundle at ``source_dir`` to ``out_dir`` (replaced) whose decision threshold is chosen
    on the ``chosen_on`` splits of ``evaluation`` for ``target_sensitivity``; return the new ``decision``.

    ``evaluation``: labelled splits (2-D float32 [0, 1] images, as ``labelled_splits`` decodes them); every one
    is re-scored into the card's metrics at the new rule."""
    source = load_bundle(source_dir, CPU, with_torch=False)
    card = source.card
    if card.decision is None:
        raise ValueError(f"The bundle at {source_dir} has no decision rule (no positive class) to re-choose.")
    missing = [s for s in chosen_on if s not in evaluation]
    if missing or not chosen_on:
        raise ValueError(f"No labelled images of {missing or 'any split'} to choose the operating point on.")
    positive_class = card.decision.positive_class
    positive = card.classes.index(positive_class)
    names = [OUTPUT_NAME] + [n for n in (FEATURES_NAME,) if has_output(source.session, n)]
    outputs = {s: score_images(source.session, card.spec, labelled.images, names) for s, labelled in evaluation.items()}
    decision = mt.operating_point_decision(
        positive_class,
        positive,
        {
            s: (evaluation[s].labels, softmax(outputs[s][OUTPUT_NAME], card.temperature), evaluation[s].sources)
            for s in chosen_on
        },
        target_sensitivity,
    )
    if decision is None:
        raise ValueError(f"The splits {list(chosen_on)} have no {positive_class} images to choose a threshold on.")
    new = card.model_copy(deep=True)
    new.decision = Decision.model_validate(decision)
    new.version = version or next_version(card.version)
    rescored = LoadedBundle(source.path, new, source.session, CPU, gate=source.gate)
    by_split = {s: split_metrics(rescored, outputs[s], labelled) for s, labelled in evaluation.items()}
    metrics = dict(new.metrics)
    if "test" in by_split:
        metrics |= by_split["test"]
    metrics["by_split"] = {**metrics.get("by_split", {}), **{s: m for s, m in by_split.items() if s != "test"}}
    new.metrics = metrics
    new.training = {
        **new.training,
        "operating_point_rechosen": {
            "from": {"version": card.version, "bundle_sha256": source.digest, "threshold": card.decision.threshold},
            "command": command,
        },
    }
    new.created_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    new.git_commit = git_commit()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(source.path, out_dir, ignore=shutil.ignore_patterns(MANIFEST_FILE, CARD_FILE))
    write_card(out_dir, new)
    load_bundle(out_dir, CPU, with_torch=False)  # what was written verifies as the service checks it
    logger.info(
        "%s at P >= %.4f (was %.4f), chosen on %s; leave one source out: %s",
        positive_class,
        decision["threshold"],
        card.decision.threshold,
        "+".join(chosen_on),
        decision["leave_one_source_out"],
    )
    return decision
