"""Tune's searcher made to agree with its trial table when a sweep is restored.

Tune saves a sweep's state as separate files: the trial table (``experiment_state-<session>
.json``) and the searcher's state (``basic-variant-state-<session>.json`` for grid and random
search; ``search_gen_state-…`` and ``searcher-state-…`` for Optuna), written together into the
driver's staging folder and then uploaded to the storage one file after another, in the
background, every ten seconds or so. A driver killed during an upload leaves in the storage the
table of one save beside the searcher's state of the previous one, and ``Tuner.restore`` trusts
both: the searcher still counts as running trials that the table shows finished. Tune skips a
finished trial on resume, so the searcher never hears of its end and keeps its slot taken;
with ``max_concurrent`` slots all taken it hands out no further trial and the restored sweep
waits forever ("4 done, 0 running" of 6, the rest pending). The opposite tear loses the trials
the searcher made after the table's save.

The table is what Tune resumes, so it is the truth: at restore the searcher's bookkeeping is
rebuilt from it. The trials it shows unfinished (pending, running, paused, or errored: sweeps
resume with ``resume_errored=True``) are the live ones, each holding a slot until it ends; trials
are handed out after the last one in the table, never again one it holds, none it lacks skipped.

Under early stopping by promotion (``orchestrator.schedulers``), a trial resting at a rung is
paused, not finished, and would keep its slot: with every slot held by resting trials no new
trial would start, and nothing would promote them. ``max_concurrent`` therefore counts the
live trials less those resting (``RESTING``, kept by the scheduler under the sweep's name).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
from typing import Any

from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.search.basic_variant import _TrialIterator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict

__all__ = ["SavedTrial", "saved_trials", "ResumableVariants", "ResumableSearch",
           "SlotLimiter"]

logger = logging.getLogger(__name__)

# Tune's name of the trial table's file (TuneController.CKPT_FILE_TMPL)
_TABLE_PATTERN = "experiment_state-*.json"
_FINISHED = "TERMINATED"  # a finished trial: skipped on resume, never ended again


class SavedTrial:
    """One row of Tune's saved trial table: the trial's id, status, config, last result."""

    def __init__(self, trial_id: str, status: str, config: dict[str, Any],
                 last_result: dict[str, Any]):
        self.trial_id, self.status, self.config, self.last_result = (trial_id, status, config,
                                                                     last_result)

    @property
    def live(self) -> bool:
        """Whether the restored sweep runs it (again) and so ends it once more."""
        return self.status != _FINISHED


def saved_trials(dirpath: str) -> list[SavedTrial] | None:
    """The trial table that Tune restores from ``dirpath`` (the newest of the sessions' tables,
    by name, as Tune picks it), in its order; None if there is none."""
    try:
        names = fnmatch.filter(os.listdir(dirpath), _TABLE_PATTERN)
    except FileNotFoundError:
        return None
    if not names:
        return None
    with open(os.path.join(dirpath, max(names))) as fh:
        table = json.load(fh)  # plain JSON: each trial's state is a JSON string of its own
    trials = []
    for trial_json, metadata_json in table["trial_data"]:
        trial = json.loads(trial_json)
        metadata = json.loads(metadata_json) if isinstance(metadata_json, str) else {}
        trials.append(SavedTrial(trial["trial_id"], trial["status"], trial.get("config") or {},
                                 metadata.get("last_result") or {}))
    return trials


class _AgreesOnRestore:
    """Tune's restore of a search algorithm, then ``agree_with`` the restored trial table."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = saved_trials(dirpath)
        if trials is not None:
            self.agree_with(trials)


class _Resting:
    """The live trials of a searcher, less those resting at a rung while the call runs."""

    def __init__(self, owner: Any, attribute: str, sweep: str | None):
        self.owner, self.attribute, self.sweep = owner, attribute, sweep

    def __enter__(self) -> None:
        from orchestrator.schedulers import RESTING

        live = getattr(self.owner, self.attribute)
        self.resting = live & RESTING.get(self.sweep, set()) if self.sweep else set()
        setattr(self.owner, self.attribute, live - self.resting)

    def __exit__(self, *exc: Any) -> None:
        setattr(self.owner, self.attribute, getattr(self.owner, self.attribute) | self.resting)


class ResumableVariants(_AgreesOnRestore, BasicVariantGenerator):
    """Tune's grid and random search (``BasicVariantGenerator``, ``max_concurrent`` trials at
    once, not counting those resting at a rung of sweep ``resting``) whose restore agrees with
    the restored trial table (see the module docstring)."""

    def __init__(self, max_concurrent: int = 0, resting: str | None = None):
        super().__init__(max_concurrent=max_concurrent)
        self.resting = resting

    def next_trial(self):
        with _Resting(self, "_live_trials", getattr(self, "resting", None)):
            return super().next_trial()

    def agree_with(self, trials: list[SavedTrial]) -> None:
        """Bring the generator in line with the restored table ``trials``."""
        made = _made_by(self._uuid_prefix, trials)
        if len(self._iterators) == 1:
            iterator = self._iterators[0]
            if iterator.counter != made:
                logger.warning("restore: the searcher's state had made %d trial(s), the trial "
                               "table holds %d; going on after the table's", iterator.counter,
                               made)
                self._iterators = [self._fresh(iterator, made)]
                self._finished = False
                self._trial_iter = None
                self._trial_generator = itertools.chain(*self._iterators)
        self._live_trials = {t.trial_id for t in trials if t.live}

    def _fresh(self, iterator: _TrialIterator, made: int) -> _TrialIterator:
        """The iterator of the same search, past its first ``made`` trials. Grid points come in
        the same order every time, so the trials after the table's are the ones it lacks."""
        fresh = _TrialIterator(uuid_prefix=self._uuid_prefix, num_samples=iterator.num_samples,
                               unresolved_spec=iterator.unresolved_spec,
                               constant_grid_search=iterator.constant_grid_search,
                               lazy_eval=iterator.lazy_eval, start=0,
                               random_state=iterator.random_state)
        def skip(resolved_vars, spec) -> None:  # counted, without building the trial
            fresh.counter += 1

        fresh.create_trial = skip
        try:
            for _ in range(made):
                next(fresh)
        except StopIteration:
            pass
        finally:
            del fresh.create_trial
        return fresh


def _made_by(prefix: str, trials: list[SavedTrial]) -> int:
    """How many trials the generator with ids ``<prefix><index>`` had made: one past the
    highest index in the table (it numbers its trials 0, 1, ... in order)."""
    indices = [int(t.trial_id[len(prefix):]) for t in trials
               if t.trial_id.startswith(prefix) and t.trial_id[len(prefix):].isdigit()]
    return max(indices) + 1 if indices else 0


class SlotLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter``, not counting the trials resting at a rung of sweep
    ``resting``."""

    def __init__(self, searcher, max_concurrent: int, resting: str | None = None):
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.resting = resting

    def suggest(self, trial_id: str):
        with _Resting(self, "live_trials", self.resting):
            return super().suggest(trial_id)


class ResumableSearch(_AgreesOnRestore, SearchGenerator):
    """Tune's wrapper of a ``Searcher`` (Optuna's, behind a ``ConcurrencyLimiter``) whose
    restore agrees with the restored trial table (see the module docstring)."""

    def agree_with(self, trials: list[SavedTrial]) -> None:
        """Bring the wrappers and the searcher in line with the restored table ``trials``."""
        if self._counter != len(trials):
            logger.warning("restore: the searcher's state had made %d trial(s), the trial "
                           "table holds %d; going on after the table's", self._counter,
                           len(trials))
        self._counter = len(trials)  # each trial of the table was made by this generator
        searcher = self.searcher
        while hasattr(searcher, "searcher"):
            if isinstance(searcher, ConcurrencyLimiter):
                searcher.live_trials = {t.trial_id for t in trials if t.live}
                searcher.num_unfinished_live_trials = len(searcher.live_trials)
                searcher.cached_results = {}
            searcher = searcher.searcher
        if isinstance(searcher, OptunaSearch):
            _agree_optuna(searcher, trials)


def _agree_optuna(search: OptunaSearch, trials: list[SavedTrial]) -> None:
    """Optuna's study in line with the table: a trial of the table that the study never asked
    for is asked for now with the trial's own values (Optuna tells it its result when it ends);
    a finished one whose end the study missed is told its last result; a trial the study asked
    for that the table lacks never runs under its id, and is told failed."""
    in_table = set()
    for trial in trials:
        in_table.add(trial.trial_id)
        if trial.trial_id not in search._ot_trials:
            search._ot_study.enqueue_trial(flatten_dict(trial.config), skip_if_exists=False)
            if callable(search._space):  # define-by-run: the enqueued values are drawn
                search._ot_trials[trial.trial_id] = search._ot_study.ask()
                search._suggest_from_define_by_run_func(search._space,
                                                        search._ot_trials[trial.trial_id])
            else:
                search._ot_trials[trial.trial_id] = search._ot_study.ask(
                    fixed_distributions=search._space)
        if not trial.live and trial.trial_id not in search._completed_trials:
            search.on_trial_complete(trial.trial_id, result=trial.last_result or None)
    for trial_id in list(search._ot_trials):
        if trial_id not in in_table and trial_id not in search._completed_trials:
            search.on_trial_complete(trial_id, error=True)
