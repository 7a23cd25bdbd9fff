"""On-demand benchmarks (not part of the test suite): quality tables, NBA ablations, pipeline and service speed."""
