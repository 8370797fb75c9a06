"""Results aggregation: run folders to summary tables, run comparisons and a bar chart.

The numbers users quote come from here, so the rules are explicit (and tested):

- datasets sharing a `group` (PAXRay-4's 4 binary tasks) are averaged into one entry first, as MESS
  does; a group counts only when every member finished;
- the suite mean is the plain arithmetic mean over entries (MESS, the papers' "avg" columns), and a
  domain mean is the plain mean of that domain's entries (not a mean of means);
- a missing or failed entry is never dropped silently: every mean says over how many of how many
  entries it is and names what is not in it;
- percent values are shown like mmseg (`np.round(x * 100, 2)`); CSVs also keep the unrounded fraction.

Run folder (written by `ovseg bench`, read through its schema `ovseg.evaluation.rundir`): `config.yaml`
and `datasets/<name>.json`; this package adds `summary.csv` and `summary.md`. Only stdlib, PyYAML (via
omegaconf) and, for the chart, matplotlib.

Modules: `results` reads a run folder, `summary` computes entries and means, `summary_files` writes
summary.md / summary.csv, `compare` puts several runs side by side; `numbers` formats values.
"""

from .compare import compare_runs, comparison_table, run_labels
from .numbers import pct
from .results import DatasetResult, RunResults, load_run
from .summary import Entry, Mean, Summary, summarize
from .summary_files import RANDOM_WEIGHTS_LINE, results_table, summary_markdown, summary_rows, write_summary

__all__ = [
    "RANDOM_WEIGHTS_LINE", "DatasetResult", "Entry", "Mean", "RunResults", "Summary", "compare_runs",
    "comparison_table", "load_run", "pct", "results_table", "run_labels", "summarize", "summary_markdown",
    "summary_rows", "write_summary",
]
