"""Exports: verdicts, stalls and counters in the formats other tools read (Prometheus
metrics, Chrome/Perfetto traces, an offline HTML timeline, OpenTelemetry logs).
Imports wire and analysis only; the CLI decides where they go."""
