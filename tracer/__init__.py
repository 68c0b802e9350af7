"""stallscope node tracer: loads the kernel probes, samples NVML, streams batches."""

__version__ = "0.1.0"
