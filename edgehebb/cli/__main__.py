"""``python -m edgehebb.cli``: the same as the ``edgehebb`` script."""

from edgehebb.cli import main

main()
