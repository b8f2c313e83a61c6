"""`python -m qtool` runs the CLI."""
from qtool.cli import main

main()
