"""The gem3d command, demo, evaluation, benchmarks and configs."""
