"""Typed records of what a rewrite did (or would do), and their rendering."""

from __future__ import annotations

import collections
import dataclasses

from regularize.core.text import printable

# `Site.action` values.
INSERT = "insert"  # a new dropout layer goes after the layer
UPDATE = "update"  # the tool's own layer (or an RNN setting) gets a new rate
KEEP = "keep"  # dropout that was already there stays as it is
SKIP = "skip"  # a candidate the rewrite leaves alone; `reason` says why
REMOVE = "remove"  # remove_dropout strips it


@dataclasses.dataclass(frozen=True)
class Site:
    """One place where dropout could go, and what the rewrite does there.

    Attributes:
        layer: Path of the layer the dropout follows (or the recurrent layer),
            nested models joined with "/", e.g. "resnet50/conv1_relu".
        layer_class: Keras class name of that layer.
        kind: "Dropout", "SpatialDropout1D/2D/3D", "recurrent", ...
        rate: The rate applied, or None for a skipped site.
        action: One of "insert", "update", "keep", "skip", "remove".
        reason: Why the rewrite did what it did.
        shape: The output shape of the layer, e.g. "(None, 8, 8, 64)".
        depth: Position in the graph, 0 at the inputs, 1 at the outputs.
        existing: Dropout the site already has, e.g. "Dropout(0.5)", or "".
    """

    layer: str
    layer_class: str
    kind: str
    rate: float | None
    action: str
    reason: str
    shape: str = ""
    depth: float | None = None
    existing: str = ""


@dataclasses.dataclass
class Report:
    """Collects the sites of one rewrite; pass one to `add_dropout(report=...)`."""

    sites: list[Site] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def add(self, site: Site) -> None:
        self.sites.append(site)

    def counts(self) -> dict[str, collections.Counter]:
        """Number of sites per action, then per kind (or per reason for skips)."""
        counts: dict[str, collections.Counter] = {}
        for site in self.sites:
            key = site.reason if site.action in (SKIP, KEEP) else site.kind
            counts.setdefault(site.action, collections.Counter())[key] += 1
        return counts

    def changed(self) -> int:
        """How many sites the rewrite changes."""
        return sum(s.action in (INSERT, UPDATE, REMOVE) for s in self.sites)

    def with_dropout(self) -> int:
        """How many sites carry dropout the policy asked for once the rewrite is done.

        Inserted and updated sites count, and so do kept ones with a rate (the
        tool's own layer from an earlier run, an RNN already at the rate); a
        site kept because the model's own dropout is there (no rate) does not.
        0 after `add_dropout` means the policy put no dropout anywhere.
        """
        return sum(
            s.action in (INSERT, UPDATE) or (s.action == KEEP and s.rate is not None)
            for s in self.sites
        )

    def summary_lines(self, *, planned: bool = False) -> list[str]:
        """Short human summary: one line per action, most common first; `printable`.

        Args:
            planned: Say what a plan would do ("would insert 4 sites"), not
                what was done ("inserted 4 sites").
        """
        verbs = _PLANNED if planned else _DONE
        lines = []
        counts = self.counts()
        for action in (INSERT, UPDATE, REMOVE, KEEP, SKIP):
            counter = counts.get(action)
            if not counter:
                continue
            total = sum(counter.values())
            parts = ", ".join(f"{n} {key}" for key, n in counter.most_common())
            lines.append(printable(f"{verbs[action]} {_plural(total, 'site')}: {parts}"))
        if not lines:
            lines.append("no candidate sites found")
        return lines

    def to_dict(self) -> dict:
        return {
            "sites": [dataclasses.asdict(s) for s in self.sites],
            "summary": {a: dict(c) for a, c in self.counts().items()},
            "warnings": list(self.warnings),
        }

    def rows(self) -> list[dict[str, str]]:
        """One row of display strings per site, keyed by `COLUMNS`; names made `printable`."""
        rows = []
        for s in self.sites:
            rows.append(
                {
                    "action": s.action,
                    "layer": printable(s.layer),
                    "class": printable(s.layer_class),
                    "shape": printable(s.shape),
                    "depth": "" if s.depth is None else f"{s.depth:.2f}",
                    "existing": printable(s.existing) or "-",
                    "dropout": printable(s.kind if s.rate is None else f"{s.kind}({s.rate:g})"),
                    "reason": printable(s.reason),
                }
            )
        return rows

    def render_plan(self) -> str:
        """A plain-text table of the sites and a summary, for `--dry-run`,
        `inspect` without a terminal, and golden files."""
        rows = self.rows()
        widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in COLUMNS}
        lines = []
        for row in [{c: c.upper() for c in COLUMNS}] + rows if rows else []:
            cells = [row[c].ljust(widths[c]) for c in COLUMNS]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines + self.summary_lines(planned=True))


_DONE = {INSERT: "inserted", UPDATE: "updated", REMOVE: "removed", KEEP: "kept", SKIP: "skipped"}
_PLANNED = {action: f"would {action}" for action in _DONE}
COLUMNS = ("action", "layer", "class", "shape", "depth", "existing", "dropout", "reason")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
