"""Pipeline stages: one thin CLI each (python -m stages.<name> --help): argparse -> one library call."""
