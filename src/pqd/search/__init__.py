"""``pqd search``: run a recipe's stages in every order, decide pairwise order wins, rank.

    search = run_search(load_recipe("recipes/search-quickstart.yaml"), "runs/search")

A search recipe is a normal recipe plus a ``search:`` section (:class:`pqd.recipe.SearchSpec`).
Every trial is an ordinary, fully resolved pqd recipe that loads the search's ONE shared
baseline checkpoint (trained once into ``DIR/baseline/`` by the normal pipeline, or the
recipe's ``baseline.checkpoint``), with the same data and seed(s) for every order:

- permutations: every order of the n stages (n! runs per seed); position i of every order
  gets ``budget[i]`` % of ``total_epochs`` (:func:`~pqd.search.trials.allocate_epochs`);
- pairwise (Order of Compression): for each pair A, B the two-stage runs A->B and B->A
  (n(n-1) runs per seed). Each gets the epochs of the FIRST TWO positions of the permutation
  allocation, so A->B is exactly the A->B prefix that the permutation A->B->C starts with
  (same epochs, same per-stage seeds); the winner (:func:`~pqd.search.decide.decide_pair`)
  gives an edge "A before B", and :func:`~pqd.search.decide.topological_order` sorts the
  graph or reports the cycle;
- references: each stage alone with all ``total_epochs`` (prune only, quantize only...).

Trials train (and export) through an executor: in this process (sequential, the default),
in ``workers`` local processes, or as one Ray task each. Measuring always happens here, on
the driver, one run at a time and never while a trial trains: each trial's ``record.json``
is completed by :func:`pqd.pipeline.measure_run`, and at the end every deployed artifact is
timed once more in one interleaved latency panel (batch 1), so that the ranking and the
frontier compare latencies taken side by side rather than minutes apart.

Each run folder is keyed by a hash of its resolved recipe (:func:`pqd.runs.trial_key`, with
the baseline checkpoint's content hash and the data folder in place of paths): re-running the
same command reuses finished trials (measuring those trained but not yet measured) and
redoes missing, half-finished and failed ones. A trial that fails with a PqdError (e.g. its
loss diverged) is reported as failed and loses its pairwise comparison; the search goes on.

Writes ``DIR/search.json`` (per-trial summaries with paths to their records, the groups
over seeds, ranking, pairwise table, derived order or cycle, Pareto set, run counts),
``report.md``, ``report.html`` (self-contained) and ``plots/*.png``.
"""

from pqd.search.run import run_search
from pqd.search.summary import SEARCH_FILE, load_search
from pqd.search.trials import baseline_trial, search_plan_text

__all__ = [
    "SEARCH_FILE",
    "baseline_trial",
    "load_search",
    "run_search",
    "search_plan_text",
]
