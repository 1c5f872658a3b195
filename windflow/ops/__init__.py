"""Operations: measuring a model where it runs (``profile``) and planning the capacity a
workload needs (``workload``, ``planner``, ``simulate``). docs/operations.md."""
