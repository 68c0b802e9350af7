"""stallscope collector: receives tracer batches, stores them, blames GPU idle time."""
