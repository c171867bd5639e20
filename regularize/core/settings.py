"""The walk's sites that are settings, not layers: RNN dropout and layers that own theirs.

An RNN layer's `dropout` / `recurrent_dropout` and a layer that applies dropout from its
own config (MultiHeadAttention, transformer blocks: `regularize.core.owned`) get no new
layer beside them: the layer is rebuilt with new values. `SettingSites` is the part of
the graph walk (`regularize.core.walk`) that decides them; it uses the walk's own
services (`_decide`, `_call`, `apply`, `record_site`).
"""

from __future__ import annotations

from regularize.core import owned
from regularize.core import terms
from regularize.core.actions import Rebuild
from regularize.core.mode import Mode
from regularize.core.protocols import LayerFacts
from regularize.core.report import INSERT
from regularize.core.report import KEEP
from regularize.core.report import REMOVE
from regularize.core.report import SKIP
from regularize.core.report import UPDATE
from regularize.core.rules import OWNED
from regularize.core.rules import RECURRENT


class SettingSites:
    """Decides the setting sites of one graph walk (mixed into `walk._GraphWalk`)."""

    def _decided(self, node, op, facts: LayerFacts, auto_kind: str, site, existing):
        """The policy's decision for a layer's own settings, or None once `site` says why not."""
        decision = self._decide(node, op, facts, auto_kind)
        skip = self.inert or (decision.reason if decision.skipped else None)
        if skip:
            site(None, SKIP, skip, existing)
            return None
        return decision

    def _recurrent(self, node, op, facts: LayerFacts) -> None:
        run = self.run_
        config = self.view.config(op)
        settings = list(terms.dropout_settings(config))

        def site(rate, action, reason, existing=""):
            self.record_site(node, facts, RECURRENT, rate, action, reason, existing)

        if not settings:
            site(None, SKIP, "cell has no dropout setting")
            return self._call(node, op)
        old = (settings[0]["dropout"], settings[0]["recurrent_dropout"])
        existing = terms.describe_rnn(old)
        if run.mode == Mode.STRIP:
            new_values = (0.0, 0.0)
        else:
            decision = self._decided(node, op, facts, RECURRENT, site, existing)
            if decision is None:
                return self._call(node, op)
            rec = decision.recurrent_rate
            new_values = (decision.rate, old[1] if rec is None else rec)
        reason = terms.describe_change(old, new_values)
        if all((s["dropout"], s["recurrent_dropout"]) == new_values for s in settings):
            action, reason = (SKIP, "rate is 0") if new_values == (0.0, 0.0) else (KEEP, reason)
            site(new_values[0] or None, action, reason, existing)
            return self._call(node, op)
        if facts.wrapper is not None:
            # Rebuilding from config would drop the wrapper and its pruning
            # or quantization state.
            site(None, SKIP, f"wrapped in {facts.wrapper}: left as it is", existing)
            return self._call(node, op)
        if run.mode == Mode.STRIP:
            action = REMOVE
        else:
            action = INSERT if old == (0.0, 0.0) else UPDATE
        site(new_values[0], action, reason, existing)
        if new_values[1] > 0 and run.mode == Mode.ADD:
            run.result.warn(terms.CUDNN)
            if terms.has_lstm_cell(config):
                run.result.warn(terms.LSTM_KERNEL)
        elif old[1] > 0 and new_values[1] == 0 and terms.returns_to_fused_lstm(config, settings):
            run.result.warn(terms.LSTM_KERNEL_BACK)
        for s in settings:
            s["dropout"], s["recurrent_dropout"] = new_values
        self.apply(node, Rebuild(op, config, new_values))

    # -- layers that own their dropout ----------------------------------------

    def _owned(self, node, op, facts: LayerFacts) -> None:
        """Rebuilds a layer with new values for the dropout keys of its config.

        Like an RNN layer: dropout after a MultiHeadAttention or a transformer
        block would not be the dropout it was trained with, so its own
        settings (`LayerFacts.owned`) change. A layer that has none but
        applies an activation inside is reported as skipped.
        """
        run = self.run_
        keys = facts.owned

        def site(rate, action, reason, existing=""):
            self.record_site(node, facts, OWNED, rate, action, reason, existing)

        if not keys:
            why = f"{facts.class_name} applies its activation inside and has no dropout setting"
            site(None, SKIP, why)
            return self._call(node, op)
        existing = owned.describe_existing(keys)
        if run.mode == Mode.STRIP:
            settings = dict.fromkeys(owned.Role, 0.0)
        else:
            decision = self._decided(node, op, facts, OWNED, site, existing)
            if decision is None:
                return self._call(node, op)
            settings = {
                owned.Role.GENERAL: decision.rate,
                owned.Role.ATTENTION: decision.attention_rate,
                owned.Role.RECURRENT: decision.recurrent_rate,
            }
        values = owned.new_values(keys, settings)
        old = tuple(k.value for k in keys)
        reason = owned.describe(keys, values)
        top = max(values)
        if values == old:
            if top == 0:
                unset = all(settings[k.role] is None for k in keys)
                site(None, SKIP, owned.unset_reason(keys) if unset else "rate is 0", existing)
            else:
                site(top, KEEP, reason, existing)
            return self._call(node, op)
        switch = owned.switches_kernel(facts.attention_kernel, old, values)
        if (
            switch
            and run.mode == Mode.ADD
            and (settings[owned.Role.ATTENTION] is None or self.policy.exact)
        ):
            # Only a user who asked for attention dropout accepts the rounding.
            site(None, SKIP, owned.KERNEL_SWITCH_SKIP, existing)
            return self._call(node, op)
        refusal = facts.rebuild_refusal
        if refusal is None and facts.wrapper is not None:
            refusal = f"wrapped in {facts.wrapper}: left as it is"
        config = self.view.config(op)
        if refusal is None:
            refusal = owned.check_rebuild(self.view, config, keys, values)
        if refusal is not None:
            site(None, SKIP, refusal, existing)
            return self._call(node, op)
        if run.mode == Mode.STRIP:
            action = REMOVE
        else:
            action = INSERT if not any(old) else UPDATE
        site(top, action, reason, existing)
        attention = [v for k, v in zip(keys, values, strict=True) if k.role == owned.Role.ATTENTION]
        if run.mode == Mode.ADD and any(attention):
            run.result.warn(owned.ATTENTION_WARNING)
        if switch:
            run.result.warn(owned.KERNEL_SWITCH_WARNING)
        self.apply(node, Rebuild(op, config, values))
