"""``python -m runcycles_server`` runs the ``cycles`` CLI."""

from runcycles_server.cli import main

main()
