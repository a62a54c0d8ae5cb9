"""What each `surgun` subcommand runs (cli.py builds the parser and imports one of these only when it runs)."""
