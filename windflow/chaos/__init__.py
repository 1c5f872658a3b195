"""Chaos testing (``windflow bench chaos``): seeded schedules of sessions and faults
(``schedule``) played against a real stack (``cluster`` runs and breaks its processes,
``injector`` fires the faults, ``player`` is each client, ``runner`` plays one schedule and
collects what the checks need), the checker of the histories the clients recorded
(``history``), and the recovery measure (``recovery``)."""
