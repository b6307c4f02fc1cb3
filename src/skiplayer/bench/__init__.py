"""Benchmark harness: `runner` (shared measuring, row files, aggregation), `benchmark`, `sweep`, `correctness`,
`report`, and `distributed` (torchrun sharding)."""
