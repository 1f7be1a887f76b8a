"""Studies: many extractions as data. `spec` (YAML specs), `store` (Parquet units), `runner` (Dask),
`analysis` (tables, intervals, ROC points, baselines), `derived` (settings-keyed derived data),
`distill` (the distillation baseline), `provenance` (where a result was computed)."""
