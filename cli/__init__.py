"""stallscope: blame GPU idle time on the exact IO or packet stall that caused it.

The installed package is assembled from the repository's top-level folders, one
per stage of the data flow (see pyproject.toml and docs/design.md):

  stallscope.bpf        bpf/        kernel probes (C) and the record contract
  stallscope.tracer     tracer/     node agent: loads probes, drains rings, samples NVML
  stallscope.wire       wire/       the contract between tracer and collector
  stallscope.collector  collector/  receives, stores and forwards batches
  stallscope.analysis   analysis/   idle intervals, blame, verdicts (numpy only)
  stallscope            cli/        the `stallscope` command: the only place that wires them
  stallscope.sim        sim/        NVML simulator, stalling filesystem, demo trainer
"""

__version__ = "0.1.0"
