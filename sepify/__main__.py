"""``python -m sepify``: the same as the ``sepify`` command."""

from sepify.cli import main

main()
