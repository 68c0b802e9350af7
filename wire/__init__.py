"""The wire contract between tracer and collector: the schema (parsed from
bpf/stallscope.h), the batch codec, the ZeroMQ transport and the recording
format. It imports neither the tracer nor the collector; both import it."""
