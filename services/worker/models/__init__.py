"""Models served by the worker, behind the ``WorldModel`` contract (see ``base``)."""
