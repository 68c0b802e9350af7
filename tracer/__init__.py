"""stallscope node tracer: loads the kernel probes, samples NVML, streams batches."""


