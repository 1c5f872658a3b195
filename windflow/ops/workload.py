"""The planner's inputs: a workload (what must be served) and a catalog (what can be
rented), both YAML, parsed and checked here with every error naming file, line and field.

Workload::

    catalog: catalog.yaml          # relative to this file (or `windflow plan --catalog`)
    target_utilization: 0.9        # admission's ceiling on a replica's step thread
    max_spot_share: 0.5            # of each demand's peak, at most this much on spot
    simulation: {seconds: 20, seed: 1}
    demands:
      - name: arena-us             # optional; default "<model>/<region>"
        model: windflow-world
        region: us-east
        fps: 24
        steps: 2                   # what sessions ask for (rung 0); default the model's
        min_steps: 1               # the lowest acceptable rung; default = steps
        full_quality_share: 0.5    # at least this share of the peak served at `steps`
        latency_ms: 40             # a frame's deadline -> encoded, on the worker
        trace: [40, 30, ...]       # concurrent sessions by hour; or peak_sessions: N
        format: jpeg               # or rgb; width/height: output size (0 = native)
        mean_session_s: 600        # how long a session lasts (the simulation)

Catalog::

    worker_classes:
      - name: cpu-2core
        memory_gb: 8
        price_per_hour: 0.10
        spot: {price_per_hour: 0.03, eviction_rate: 0.05}
        regions:                   # a list of names, or name -> overrides
          us-east: {}
          ap-south: {price_per_hour: 0.12, spot_price_per_hour: 0.04, max_replicas: 40}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from windflow.ops import yamlio
from windflow.ops.yamlio import SpecError

FORMATS = ("jpeg", "rgb")


@dataclass(frozen=True, slots=True)
class Demand:
    """One kind of session to serve in one region, at its peak."""

    name: str
    model: str
    region: str
    fps: float
    latency_ms: float
    peak_sessions: int
    trace: tuple[int, ...] = ()
    """Concurrent sessions by hour (empty: only ``peak_sessions`` was given)."""
    steps: int = 0
    """Asked step count (rung 0); 0 = the model's default (from its profile)."""
    min_steps: int = 0
    """Lowest acceptable step count; 0 = ``steps`` (no reduced quality)."""
    full_quality_share: float = 0.0
    format: str = "jpeg"
    width: int = 0
    height: int = 0
    mean_session_s: float = 600.0
    version: str = ""
    """The model version the profiles must be of ('' = the version the registry loads)."""
    line: int = 0
    file: str = ""

    def where(self) -> str:
        return f"{self.file} line {self.line}: demand {self.name!r}"


@dataclass(frozen=True, slots=True)
class Simulation:
    seconds: float = 20.0
    seed: int = 1
    ramp_s: float = 2.0
    """The peak's sessions arrive spread over this long at the start."""


@dataclass(frozen=True, slots=True)
class Workload:
    path: Path
    demands: tuple[Demand, ...]
    catalog: Path | None = None
    target_utilization: float = 0.9
    max_spot_share: float = 0.5
    simulation: Simulation = field(default_factory=Simulation)


@dataclass(frozen=True, slots=True)
class RegionOffer:
    price_per_hour: float
    spot_price_per_hour: float | None
    max_replicas: int | None
    """A quota on replicas (on-demand and spot together) of the class in the region."""


@dataclass(frozen=True, slots=True)
class WorkerClass:
    name: str
    memory_gb: float
    price_per_hour: float
    spot_price_per_hour: float | None
    eviction_rate: float
    """Share of spot replicas lost per hour: spot capacity counts (1 - this) of itself."""
    regions: dict[str, RegionOffer]
    accelerator: str = ""
    description: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Catalog:
    path: Path
    classes: tuple[WorkerClass, ...]

    def by_name(self) -> dict[str, WorkerClass]:
        return {c.name: c for c in self.classes}

    def in_region(self, region: str) -> list[WorkerClass]:
        return [c for c in self.classes if region in c.regions]


def load_workload(path: Path) -> Workload:
    root = yamlio.load(path).mapping()
    root.allow("catalog", "target_utilization", "max_spot_share", "simulation", "demands")
    catalog = root.get("catalog")
    target = root.number("target_utilization", 0.9, above=0.0, maximum=1.0)
    spot_share = root.number("max_spot_share", 0.5, minimum=0.0, maximum=1.0)
    simulation = Simulation()
    sim_node = root.get("simulation")
    if sim_node is not None:
        sim = sim_node.mapping().allow("seconds", "seed", "ramp_s")
        simulation = Simulation(
            seconds=sim.number("seconds", 20.0, above=0.0, maximum=3600.0),
            seed=sim.integer("seed", 1),
            ramp_s=sim.number("ramp_s", 2.0, minimum=0.0),
        )
        sim.done()
    items = root.need("demands")
    demands = [_demand(node, str(path)) for node in items.sequence()]
    if not demands:
        raise items.error("expected at least one demand")
    seen: dict[str, int] = {}
    for d in demands:
        if d.name in seen:
            raise SpecError(
                f"{path} line {d.line}: demand name {d.name!r} is used twice (first on line "
                f"{seen[d.name]}); give each a distinct `name`"
            )
        seen[d.name] = d.line
    root.done()
    return Workload(
        path=path,
        demands=tuple(demands),
        catalog=(path.parent / catalog.string()) if catalog is not None else None,
        target_utilization=target,
        max_spot_share=spot_share,
        simulation=simulation,
    )


DEMAND_FIELDS = (
    "name",
    "model",
    "region",
    "fps",
    "latency_ms",
    "steps",
    "min_steps",
    "full_quality_share",
    "format",
    "width",
    "height",
    "mean_session_s",
    "version",
    "peak_sessions",
    "trace",
)


def _demand(node: yamlio.Node, file: str) -> Demand:
    m = node.mapping().allow(*DEMAND_FIELDS)
    model = m.string("model")
    region = m.string("region")
    name = m.string("name", f"{model}/{region}")
    fps = m.number("fps", above=0.0, maximum=1000.0)
    latency = m.number("latency_ms", above=0.0)
    steps = m.integer("steps", 0, minimum=1)
    min_steps = m.integer("min_steps", 0, minimum=1)
    if steps and min_steps > steps:
        raise m.need("min_steps").error(f"must be at most steps ({steps}), got {min_steps}")
    share = m.number("full_quality_share", 0.0, minimum=0.0, maximum=1.0)
    fmt_node = m.get("format")
    fmt = "jpeg"
    if fmt_node is not None:
        fmt = fmt_node.string().lower()
        if fmt not in FORMATS:
            raise fmt_node.error(f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    width = m.integer("width", 0, minimum=0)
    height = m.integer("height", 0, minimum=0)
    if (width == 0) != (height == 0):
        raise m.need("width" if width == 0 else "height").error(
            "give both width and height, or neither (native size)"
        )
    mean_s = m.number("mean_session_s", 600.0, above=0.0)
    version = m.string("version", "")
    peak_node, trace_node = m.get("peak_sessions"), m.get("trace")
    trace: tuple[int, ...] = ()
    if peak_node is not None and trace_node is not None:
        raise trace_node.error("give peak_sessions or trace, not both")
    if trace_node is not None:
        points = trace_node.sequence()
        if not points:
            raise trace_node.error("expected at least one hourly figure")
        trace = tuple(p.integer(minimum=0) for p in points)
        peak = max(trace)
    elif peak_node is not None:
        peak = peak_node.integer(minimum=0)
    else:
        raise SpecError(
            f"{file} line {node.line}: {node.path}: missing peak_sessions (or a trace of "
            "concurrent sessions by hour)"
        )
    m.done()
    return Demand(
        name=name,
        model=model,
        region=region,
        fps=fps,
        latency_ms=latency,
        peak_sessions=peak,
        trace=trace,
        steps=steps,
        min_steps=min_steps,
        full_quality_share=share,
        format=fmt,
        width=width,
        height=height,
        mean_session_s=mean_s,
        version=version,
        line=node.line,
        file=file,
    )


def load_catalog(path: Path) -> Catalog:
    root = yamlio.load(path).mapping().allow("worker_classes")
    items = root.need("worker_classes")
    classes = [_worker_class(node) for node in items.sequence()]
    if not classes:
        raise items.error("expected at least one worker class")
    seen: set[str] = set()
    for c in classes:
        if c.name in seen:
            raise SpecError(f"{path} line {c.line}: worker class {c.name!r} is listed twice")
        seen.add(c.name)
    root.done()
    return Catalog(path, tuple(classes))


def _worker_class(node: yamlio.Node) -> WorkerClass:
    m = node.mapping().allow(
        "name", "memory_gb", "price_per_hour", "spot", "regions", "accelerator", "description"
    )
    name = m.string("name")
    price = m.number("price_per_hour", minimum=0.0)
    memory = m.number("memory_gb", above=0.0)
    spot_price: float | None = None
    eviction = 0.0
    spot_node = m.get("spot")
    if spot_node is not None:
        spot = spot_node.mapping().allow("price_per_hour", "eviction_rate")
        spot_price = spot.number("price_per_hour", minimum=0.0)
        eviction = spot.number("eviction_rate", minimum=0.0, maximum=1.0)
        if eviction >= 1.0:
            raise spot.need("eviction_rate").error("must be below 1 (all capacity lost)")
        spot.done()
    regions_node = m.need("regions")
    regions: dict[str, RegionOffer] = {}
    if regions_node.is_sequence():
        for item in regions_node.sequence():
            regions[item.string()] = RegionOffer(price, spot_price, None)
    else:
        offers = regions_node.mapping()
        for region in list(offers.keys()):
            offer_node = offers.need(region)
            if offer_node.value() is None:
                regions[region] = RegionOffer(price, spot_price, None)
                continue
            offer = offer_node.mapping().allow(
                "price_per_hour", "spot_price_per_hour", "max_replicas"
            )
            region_spot: float | None = spot_price
            if "spot_price_per_hour" in offer:
                if spot_price is None:
                    raise offer.need("spot_price_per_hour").error(
                        "the class has no `spot` section (give its eviction_rate there)"
                    )
                region_spot = offer.number("spot_price_per_hour", minimum=0.0)
            quota = offer.get("max_replicas")
            regions[region] = RegionOffer(
                offer.number("price_per_hour", price, minimum=0.0),
                region_spot,
                quota.integer(minimum=0) if quota is not None else None,
            )
            offer.done()
        offers.done()
    if not regions:
        raise regions_node.error("expected at least one region")
    accelerator = m.string("accelerator", "")
    description = m.string("description", "")
    m.done()
    return WorkerClass(
        name=name,
        memory_gb=memory,
        price_per_hour=price,
        spot_price_per_hour=spot_price,
        eviction_rate=eviction,
        regions=regions,
        accelerator=accelerator,
        description=description,
        line=node.line,
    )
