"""What ``make run`` does around ``dvc exp run``: one local Prefect server, the profile for this machine,
the end-of-run summary. Not flows and not stages: command-line tools of the Makefile."""
