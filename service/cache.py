"""The measurement cache shared by every job (table ``fitnas_measurements``).

Implements ``search.study.MeasurementCache``: ``get(key)`` / ``put(key, outcome)`` with
``key = MeasureSettings.key(spec_hash, target)``, so a second job on the same target,
runtime, input shape, batch and dtype reuses the first job's measurements.

What is kept is the policy both caches share (``search.study.MeasurementCache``):
successful outcomes only (``search.study.cacheable``), and the first stored outcome for a
key wins; later puts for the same key are ignored.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from search.evaluators.types import EvalOutcome
from search.study import cacheable
from service.db import Database, utcnow
from service.models import Measurement

log = logging.getLogger("fitnas.cache")

class DBMeasurementCache:
    """A view of the shared cache for one job (``target`` and ``job_id`` label the rows
    it writes; lookups are by key alone, the key already includes the target)."""

    def __init__(self, db: Database, target: str, job_id: str | None = None) -> None:
        self.db = db
        self.target = target
        self.job_id = job_id
        self.hits = 0
        self.misses = 0
        self.puts = 0

    def get(self, key: str) -> EvalOutcome | None:
        row = self.db.run(
            lambda s: s.execute(
                select(Measurement.outcome).where(Measurement.key == key)
            ).scalar_one_or_none(),
            write=False,
        )
        if row is None:
            self.misses += 1
            return None
        try:
            outcome = EvalOutcome.model_validate(row)
        except ValueError:
            log.warning("cache entry %s does not parse any more; ignoring it", key[:12])
            self.misses += 1
            return None
        self.hits += 1

        def bump(s: Session) -> None:
            s.execute(
                update(Measurement).where(Measurement.key == key)
                .values(hits=Measurement.hits + 1)
            )

        self.db.run(bump)
        return outcome

    def put(self, key: str, outcome: EvalOutcome) -> None:
        if not cacheable(outcome):
            return
        runtime = outcome.latency.runtime if outcome.latency is not None else None
        data = outcome.model_dump(mode="json")

        def op(s: Session) -> None:
            if s.get(Measurement, key) is not None:
                return
            s.add(
                Measurement(
                    key=key, target=self.target, runtime=runtime, outcome=data,
                    source_job_id=self.job_id, created_at=utcnow(),
                )
            )
            s.flush()

        try:
            self.db.run(op)
            self.puts += 1
        except IntegrityError:  # another writer stored the same key first: keep theirs
            pass
