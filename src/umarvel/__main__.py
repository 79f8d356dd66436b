"""`python -m umarvel ...`: the command line."""

from umarvel.cli import main

main()
