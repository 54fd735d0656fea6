"""``python -m crctl``: the same CLI as the ``crctl`` command."""

from crctl.cli import main

main()
