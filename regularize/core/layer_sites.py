"""The walk's sites that are layers: dropout after an activation, and dropout already there.

`LayerSites` is the part of the graph walk (`regularize.core.walk`) that decides where a
new Dropout / SpatialDropout goes after an activation (or a block output) and what
becomes of a dropout layer the model has (kept, re-targeted, removed). It uses the
walk's own services (`_decide`, `_call`, `apply`, `record_site`).
"""

from __future__ import annotations

from regularize.core import droppath
from regularize.core import terms
from regularize.core.actions import Insert
from regularize.core.actions import Remove
from regularize.core.actions import Retarget
from regularize.core.mode import Mode
from regularize.core.protocols import LayerFacts
from regularize.core.report import INSERT
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.rules import Decision

# The fate of a dropout layer that stays as it is (see `_Run.fates`).
KEPT = "kept"


def is_softmax(facts: LayerFacts) -> bool:
    """A standalone softmax (`Softmax`, `Activation("softmax")`, `ops.softmax`)."""
    if facts.class_name == "Softmax":
        return True
    return facts.is_activation_layer and facts.activation == "softmax"


class LayerSites:
    """Decides the layer sites of one graph walk (mixed into `walk._GraphWalk`)."""

    def _new_dropout(self, decision: Decision, shape: tuple, fmt: str) -> dict:
        return {
            "kind": decision.kind,
            "rate": decision.rate,
            "shape": shape,
            "data_format": fmt,
            "mc": self.policy.mc,
        }

    def _wanted_class(self, kind: str) -> str:
        return ("MC" if self.policy.mc else "") + kind

    # -- building ---------------------------------------------------------

    def _activation(self, node, op, facts: LayerFacts) -> Insert | None:
        """Decides the site after `node`; returns the dropout to insert there, if any."""
        keys = self.view.output_keys(node)
        if len(keys) != 1:
            return None
        key = keys[0]
        shape = tuple(self.view.out_shape(node))
        if self.tokens[id(node)]:
            fmt, auto_kind = "channels_last", "Dropout"
        else:
            fmt = self.data_format_near(node)
            auto_kind = terms.dropout_kind(len(shape), fmt)
        readers = self.readers.get(key, [])
        dropouts = [
            r
            for r in readers
            if self.facts(r).is_dropout and not droppath.claims(self.run_, r, self.facts(r))
        ]
        existing = ", ".join(f"{self.facts(d).label}({self.facts(d).rate:g})" for d in dropouts)
        decision = self._decide(node, op, facts, auto_kind)

        def skip(reason, action=SKIP):
            self.record_site(node, facts, decision.kind, None, action, reason, existing)

        if self.inert:
            reason = self.inert
        elif key in self.final:
            return skip("model output")
        elif decision.skipped:
            reason = decision.reason
        else:
            reason = None
        if dropouts:
            for layer in dropouts:
                other = self.facts(layer)
                # A wrapped dropout (QuantizeWrapperV2(Dropout)) stays the user's.
                if other.is_own_dropout or (
                    self.policy.layer_existing != "keep" and other.wrapper is None
                ):
                    self._retarget(node, op, facts, layer, decision, shape, fmt, reason, existing)
                else:
                    skip(f"already followed by {other.label}", KEEP)
            return None
        if reason:
            return skip(reason)
        if any(self.facts(r).is_batchnorm for r in readers):
            return skip("feeds BatchNormalization")
        if any(is_softmax(self.facts(r)) for r in readers):
            # Dropout on a softmax's logits zeros scores, it drops no class or token:
            # the probabilities shift towards the kept ones in training only.
            return skip("feeds a softmax")
        if not readers:
            return skip("output not used")
        if decision.rate == 0:
            return skip(decision.reason)
        self.record_site(
            node, facts, decision.kind, decision.rate, INSERT, decision.reason, existing
        )
        if id(op) not in self.run_.inserted:
            name = terms.unique_name(facts.name + terms.SUFFIX, self.names)
            self.names.add(name)
            self.run_.inserted[id(op)] = name
        name = self.run_.inserted[id(op)]
        return Insert(anchor=op, name=name, **self._new_dropout(decision, shape, fmt))

    def _retarget(self, node, op, facts, layer, decision, shape, fmt, skip_reason, existing):
        """Decides what becomes of a dropout layer after `node`.

        The tool's own layers always follow the policy; the model's own ones
        only with `existing = "retarget"` or `"remove"`.
        """
        run = self.run_
        other = self.facts(layer)
        old_kind = other.class_name
        own = other.is_own_dropout

        def site(kind, rate, action, reason):
            self.record_site(node, facts, kind, rate, action, reason, existing)

        if id(layer) in run.fates:  # a shared dropout, decided at its first call
            done = run.fates[id(layer)]
            why = "shared, same as its first call"
            if done is None:
                site(old_kind, other.rate, REMOVE, "shared, removed")
            elif done == KEPT:
                site(old_kind, other.rate, KEEP, why)
            else:
                site(self._wanted_class(done.kind), done.rate, UPDATE, why)
            return
        if not own and self.policy.layer_existing == "remove":
            skip_reason = "existing = remove"
        elif not skip_reason and decision.rate == 0:
            skip_reason = decision.reason
        wanted = self._wanted_class(decision.kind)
        if skip_reason:
            site(old_kind, other.rate, REMOVE, skip_reason)
            run.fates[id(layer)] = None
        elif decision.rate == other.rate and old_kind == wanted:
            why = "inserted earlier, same rate" if own else "already there, same rate"
            site(decision.kind, decision.rate, KEEP, why)
            run.fates[id(layer)] = KEPT
        else:
            reason = f"{old_kind}({other.rate:g}) -> {wanted}({decision.rate:g})"
            site(decision.kind, decision.rate, UPDATE, reason)
            args = self._new_dropout(decision, shape, fmt)
            run.fates[id(layer)] = Retarget(layer=layer, anchor=op, **args)

    # -- existing dropout layers ------------------------------------------

    def _dropout(self, node, op, facts: LayerFacts) -> None:
        run = self.run_
        strip = run.mode == Mode.STRIP or (
            self.policy.layer_existing == "remove" and id(op) not in run.fates
        )
        if strip:
            if self.view.output_keys(node)[0] in self.final:
                self.record_site(node, facts, facts.class_name, facts.rate, KEEP, "model output")
                return self._call(node, op)
            why = "strip dropout" if run.mode == Mode.STRIP else "existing = remove"
            self.record_site(node, facts, facts.class_name, facts.rate, REMOVE, why)
            return self.apply(node, Remove(op, self.view.casts_input(node)))
        fate = run.fates.get(id(op), KEPT)  # a user's dropout is left as it is
        if fate == KEPT:
            return self._call(node, op)
        self.changed = True
        if fate is None:
            return self.apply(node, Remove(op, self.view.casts_input(node)))
        return self.apply(node, fate)

    # -- recurrent layers -------------------------------------------------
