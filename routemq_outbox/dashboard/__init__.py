"""A web page to watch and steer the queue: ``routemq-outbox dashboard``, or mount
:func:`create_app` in an ASGI application of your own. Needs the ``dashboard`` extra
(``pip install "routemq-outbox[dashboard]"``)."""

from .app import create_app

__all__ = ["create_app"]
