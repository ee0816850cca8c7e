"""Everything a run leaves behind and how it reads: the run-folder format, table formatters,
intervals, plots, the paper-claims registry, summary.md and the report. Imports only core."""
