"""One module per ``gem3d`` subcommand: ``NAME``, ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``."""
