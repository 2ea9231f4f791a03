"""Live diagnostics: state, schema, attention probe, context-free floor, alarms, HTTP, Prometheus."""
