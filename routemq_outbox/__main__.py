"""``python -m routemq_outbox`` is the ``routemq-outbox`` command."""

from .cli import main

main()
